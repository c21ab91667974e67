//! Fuzzes the path every byte from the other side takes: the incremental
//! frame decoder fed in arbitrary splits, then both message decoders on
//! each payload. Any panic, overflow or runaway allocation is a bug.
#![no_main]

use libfuzzer_sys::fuzz_target;
use warren_protocol::{decode_guest_frame, decode_host_frame, encode_frame, FrameDecoder};

fuzz_target!(|data: &[u8]| {
    // The first byte picks how the stream is split into reads, so the
    // fuzzer explores partial headers and payloads too.
    let Some((&split, stream)) = data.split_first() else {
        return;
    };
    let step = usize::from(split % 31) + 1;
    let mut decoder = FrameDecoder::new(4096);
    for chunk in stream.chunks(step) {
        decoder.push(chunk);
        while let Some(frame) = decoder.next_frame() {
            let Ok(payload) = frame else { continue };
            if let Ok(msg) = decode_host_frame(&payload) {
                // Whatever decodes must survive a round trip unchanged.
                let again = encode_frame(&msg).expect("re-encode");
                assert_eq!(decode_host_frame(&again[4..]).expect("re-decode"), msg);
            }
            let _ = decode_guest_frame(&payload);
        }
    }
});
