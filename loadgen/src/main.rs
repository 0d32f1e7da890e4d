//! loadgen: drives a Link IoT Edge WebSocket server with device traffic (issue 4).

fn main() -> anyhow::Result<()> {
    anyhow::bail!("loadgen is not built yet: see issue 4")
}
