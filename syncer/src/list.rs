//! Consistent paged listing of a prefix.
//!
//! etcd 3.4 pagination rescans from the page's start key to the end of the range, so small
//! pages make a large list quadratic; pages of 10k keys pinned to one revision keep a 250k-key
//! list near the speed of a single request without its memory peak (TOOLCHAIN.md).
//!
//! [`pages`] is the one paging loop: [`list_prefix`] collects whole stored keys with it, and
//! the list→watch machine ([`crate::watcher`]) its entries relative to the prefix, checking
//! the etcd cluster ID of every page.

use std::time::Duration;

use etcd_client::{GetOptions, GetResponse};

use crate::client::MAX_MESSAGE_BYTES;
use crate::{Client, Error, Result};

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
    let mut out = Vec::new();
    let revision = pages(client, prefix, None, |resp| {
        for item in resp.kvs() {
            out.push(Kv {
                key: String::from_utf8_lossy(item.key()).into_owned(),
                value: item.value().to_vec(),
                lease: item.lease(),
                mod_revision: item.mod_revision(),
            });
        }
        Ok::<_, Error>(())
    })
    .await?;
    Ok((out, revision))
}

/// Reads every key under `prefix` in pages of [`PAGE`], all pinned to the revision of the
/// first, and hands each response to `page` (which may take its keys and values); returns
/// that revision. With `timeout`, a page that takes longer fails.
pub(crate) async fn pages<E: From<Error>>(
    client: &Client,
    prefix: &str,
    timeout: Option<Duration>,
    mut page: impl FnMut(&mut GetResponse) -> Result<(), E>,
) -> Result<i64, E> {
    let mut kv = client
        .0
        .kv_client()
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let end = prefix_range_end(prefix);
    let mut start = prefix.as_bytes().to_vec();
    let mut revision = 0;
    loop {
        let mut opts = GetOptions::new().with_range(end.clone()).with_limit(PAGE);
        if revision != 0 {
            opts = opts.with_revision(revision);
        }
        let get = kv.get(start.clone(), Some(opts));
        let resp = match timeout {
            None => get.await,
            Some(t) => tokio::time::timeout(t, get)
                .await
                .map_err(|_| Error::RequestTimeout {
                    op: "list",
                    key: prefix.to_owned(),
                    after: t,
                })?,
        };
        let mut resp = resp.map_err(|source| Error::Etcd {
            op: "list",
            key: prefix.to_owned(),
            source,
        })?;
        // Read before `page` may take the keys.
        let more = resp.more();
        let last = resp.kvs().last().map(|kv| kv.key().to_vec());
        page(&mut resp)?;
        if revision == 0 {
            revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        }
        match (more, last) {
            (true, Some(mut last)) => {
                last.push(0);
                start = last;
            }
            _ => break,
        }
    }
    Ok(revision)
}

#[cfg(test)]
mod tests {
    #[test]
    fn range_end() {
        assert_eq!(super::prefix_range_end("cilium/"), b"cilium0".to_vec());
        assert_eq!(super::prefix_range_end("a\u{7f}"), b"a\x80".to_vec());
    }
}
