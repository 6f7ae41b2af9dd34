// Shared by the JSON value targets (included with `#[path]`).

use clustermesh_types::model::Value;

/// Decodes `data`; if that succeeds, the value must re-encode to bytes that
/// decode to the same value, and encoding must be stable.
pub fn round_trip<T: Value + PartialEq + std::fmt::Debug>(data: &[u8]) -> Option<T> {
    let value = T::decode(data).ok()?;
    let encoded = value.encode();
    let again = match T::decode(&encoded) {
        Ok(v) => v,
        Err(e) => panic!(
            "{}: re-decode of own encoding failed: {e:?}\n{value:?}",
            T::KIND
        ),
    };
    assert_eq!(again, value, "{}: round trip changed the value", T::KIND);
    assert_eq!(
        again.encode(),
        encoded,
        "{}: encoding is not stable",
        T::KIND
    );
    Some(value)
}
