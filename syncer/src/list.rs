//! Consistent paged listing of a prefix.
//!
//! etcd 3.4 pagination rescans from the page's start key to the end of the range, so small
//! pages make a large list quadratic; pages of 10k keys pinned to one revision keep a 250k-key
//! list near the speed of a single request without its memory peak (TOOLCHAIN.md).

use etcd_client::{Client, GetOptions};

use crate::client::MAX_MESSAGE_BYTES;
use crate::{Error, Result};

/// Keys per page.
pub const PAGE: i64 = 10_000;

/// One stored key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kv {
    /// Full key.
    pub key: String,
    /// Raw value.
    pub value: Vec<u8>,
    /// Lease ID (0 = none).
    pub lease: i64,
    /// Revision of the last change.
    pub mod_revision: i64,
}

/// The end of the range covering every key that starts with `prefix`.
pub fn prefix_range_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Lists every key under `prefix` at one revision; returns the keys (sorted) and the revision
/// to watch from (`revision + 1`).
pub async fn list_prefix(client: &Client, prefix: &str) -> Result<(Vec<Kv>, i64)> {
    let mut kv = client
        .kv_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let end = prefix_range_end(prefix);
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    let mut out = Vec::new();
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision != 0 {
            opts = opts.with_revision(revision);
        }
        let resp = kv
            .get(start.clone(), Some(opts))
            .await
            .map_err(|source| Error::Etcd {
                op: "list",
                key: prefix.to_string(),
                source,
            })?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        let more = resp.more();
        let kvs = resp.kvs();
        for item in kvs {
            let key = String::from_utf8_lossy(item.key()).into_owned();
            out.push(Kv {
                key,
                value: item.value().to_vec(),
                lease: item.lease(),
                mod_revision: item.mod_revision(),
            });
        }
        match (more, kvs.last()) {
            (true, Some(last)) => {
                start = last.key().to_vec();
                start.push(0);
            }
            _ => break,
        }
    }
    Ok((out, revision))
}

#[cfg(test)]
mod tests {
    #[test]
    fn range_end() {
        assert_eq!(super::prefix_range_end("cilium/"), b"cilium0".to_vec());
        assert_eq!(super::prefix_range_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
