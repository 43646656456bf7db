//! The ACL file parser on arbitrary text; a parsed ACL is then asked about topics made
//! from the same input, for a client with and without a user name.
#![no_main]
use libfuzzer_sys::fuzz_target;
use waystation_broker::acl::{covers, intersects, Acl};
use waystation_broker::topic::{valid_filter, valid_topic_name};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(acl) = Acl::parse(text) else { return };
    let words: Vec<&str> = text.split_whitespace().take(16).collect();
    for (client_id, user) in [("dev1", None), ("dev/+#", Some("u")), ("x", Some("admin"))] {
        let rules = acl.for_client(client_id, user);
        for topic in words.iter().chain(["a/b", "#", "+/x", "$SYS/x", ""].iter()) {
            if valid_topic_name(topic) {
                let _ = rules.may_publish(topic);
                let _ = rules.may_read(topic);
            }
            if valid_filter(topic) {
                let _ = rules.may_subscribe(topic);
            }
        }
    }
    let filters: Vec<&str> = words.iter().copied().filter(|w| valid_filter(w)).collect();
    for a in &filters {
        for b in &filters {
            let (i, j) = (intersects(a, b), intersects(b, a));
            assert_eq!(i, j, "intersects is symmetric: {a:?} {b:?}");
            if covers(a, b) {
                assert!(i, "{a:?} covers {b:?} but does not intersect it");
            }
        }
    }
});
