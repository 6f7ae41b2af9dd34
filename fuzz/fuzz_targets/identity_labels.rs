#![no_main]

use clustermesh_types::identity::{Label, LabelArray};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(labels) = LabelArray::parse_kvstore(s) {
        let text = labels.to_kvstore_string();
        assert!(text.is_empty() || text.ends_with(';'));
        let again = LabelArray::parse_kvstore(&text).expect("own label string must parse");
        assert_eq!(again, labels);
        assert_eq!(again.to_kvstore_string(), text);
        let map = labels.to_map();
        assert_eq!(LabelArray::from_map(&map).to_map(), map);
        for label in &labels {
            assert!(labels.get(&label.key).is_some());
        }
    }
    if let Ok(label) = Label::parse(s) {
        assert_eq!(Label::parse(&label.to_string()).ok(), Some(label));
    }
});
