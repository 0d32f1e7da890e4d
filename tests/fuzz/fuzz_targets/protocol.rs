//! The Link decoder on arbitrary bytes: never panics, and every request it accepts re-encodes
//! to a message that decodes to the same envelope.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ringlink::protocol::{
    finish_request, start_client_request, strip_trailing, Decoder, Inbound, Method,
};

fuzz_target!(|data: &[u8]| {
    let mut decoder = Decoder::new();
    let mut buf = data.to_vec();
    let stripped = strip_trailing(data);
    assert!(stripped <= data.len());
    let envelope = decoder.decode(&mut buf, |r| match r {
        Ok(Some(Inbound::Request(req))) => {
            assert!(!req.product_key.is_empty() && !req.device_name.is_empty());
            Some((req.id, req.method, req.product_key.to_owned(), req.device_name.to_owned()))
        }
        Ok(Some(Inbound::Reply(_))) | Err(_) => None,
        Ok(None) => {
            assert_eq!(stripped, 0, "only an empty message is ignored");
            None
        }
    });
    if let Some((id, method, pk, dn)) = envelope {
        let mut again = Vec::new();
        start_client_request(&mut again, method.as_str(), id, &pk, &dn);
        finish_request(&mut again);
        let back = decoder.decode(&mut again, |r| match r {
            Ok(Some(Inbound::Request(req))) => {
                Some((req.id, req.method, req.product_key.to_owned(), req.device_name.to_owned()))
            }
            _ => None,
        });
        assert_eq!(back, Some((id, method, pk, dn)));
        assert!(Method::ALL.contains(&method));
    }
});
