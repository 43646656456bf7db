//! The DER walker that reads a client certificate's CN (use_identity_as_username).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = waystation_broker::tls::common_name(data);
});
