//! Frame decoder: never panics; whatever decodes re-encodes to exactly the
//! bytes it was decoded from, and decodes again to the same frame.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use nvtarget_mirror::frame::{decode, DEFAULT_MAX_BODY};

fuzz_target!(|input: &[u8]| {
    let buf = Bytes::copy_from_slice(input);
    let Ok(Some((frame, used))) = decode(&buf, DEFAULT_MAX_BODY) else {
        return;
    };
    let wire = frame.encode();
    assert_eq!(&wire[..], &input[..used]);
    assert_eq!(decode(&wire, DEFAULT_MAX_BODY), Ok(Some((frame, used))));
});
