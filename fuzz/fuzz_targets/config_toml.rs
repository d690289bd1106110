//! `Config::from_toml` on arbitrary text: never a panic; an error is `InvalidConfig` naming
//! the source; an accepted config validates and formats.
#![no_main]

use busway::{Config, ErrorKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, "fuzz.toml") {
        Err(e) => {
            assert_eq!(e.kind(), ErrorKind::InvalidConfig, "{e}");
            assert!(e.to_string().starts_with("fuzz.toml"), "{e}");
        }
        Ok(config) => {
            config.validate().expect("an accepted config validates");
            // Debug (which redacts URLs and secret-looking keys) must not panic on odd input.
            let _ = format!("{config:?}");
        }
    }
});
