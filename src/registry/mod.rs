//! The known products and devices.
