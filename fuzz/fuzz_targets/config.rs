//! The daemon's config parser (gateway/src/config.rs, compiled in as is) on arbitrary
//! text, then the checks that need no files.
#![no_main]
use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../gateway/src/config.rs"]
mod config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(config) = config::Config::parse(text) else { return };
    let _ = config.anonymous_policy();
    for bridge in &config.bridges {
        // validate() reads password and certificate files: only for bridges naming none.
        if bridge.password_file.is_none() && bridge.password_env.is_none() && bridge.tls.is_none() {
            let _ = bridge.validate();
        }
        let _ = bridge.forward_rule("sensors/a/b");
    }
});
