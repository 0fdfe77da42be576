//! Any bytes fed to the pgoutput decoder give a message or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = weir::decode::decode(data);
});
