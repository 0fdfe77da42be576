//! Any text, read as any type's output form, gives a JSON value, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weir::decode::value::{to_json, unescape_copy_field};
use weir::decode::TypeRegistry;

const OIDS: &[u32] = &[16, 20, 700, 1700, 114, 17, 1184, 1114, 1082, 1083, 1007, 1009, 1231, 1185];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let _ = unescape_copy_field(rest);
    let text = String::from_utf8_lossy(rest);
    let kind = TypeRegistry::default().kind(OIDS[pick as usize % OIDS.len()]);
    let _ = to_json(&kind, &text);
});
