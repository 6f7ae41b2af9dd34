//! Single-pass decoder of a `ClusterService` in the compact JSON that Go's `encoding/json`
//! writes, for the hot path of decoding services with thousands of backends.
//!
//! serde_json spends most of a 1k-backend decode in visitor plumbing (five strings, three
//! objects and a number per backend, each through several generic calls); scanning the
//! same bytes directly, building each backend in place and reusing the repeated port name
//! and protocol is about four times faster (~80 µs instead of ~320 µs for 1k backends,
//! where just skipping over the JSON with serde takes ~47 µs). The decoder handles a strict
//! subset of JSON: known fields only, no duplicate fields, strings without escapes,
//! unsigned integers without sign, fraction or exponent. On anything else it returns `None`
//! and the caller decodes with serde, which stays the reference for semantics and error
//! messages. Whatever this decoder accepts, serde decodes to the same value (tested
//! differentially below).

use std::collections::BTreeMap;

use super::{AddrMap, BackendZone, ClusterService, ForZone, L4Addr, PortConfiguration, SmolStr};

/// `None` = outside the subset: leave it to serde.
type R<T> = Option<T>;

struct Cursor<'a> {
    /// The whole input, checked to be UTF-8 once (so strings need no per-string check).
    s: &'a str,
    b: &'a [u8],
    i: usize,
    /// The last port name and protocol built: every backend of a service repeats the same
    /// few, and cloning one is cheaper than building it again from bytes.
    names: [SmolStr; 2],
}

impl<'a> Cursor<'a> {
    /// The next byte after JSON whitespace (not consumed).
    #[inline]
    fn peek(&mut self) -> R<u8> {
        while let Some(&c) = self.b.get(self.i) {
            if !matches!(c, b' ' | b'\n' | b'\r' | b'\t') {
                return Some(c);
            }
            self.i += 1;
        }
        None
    }

    #[inline]
    fn eat(&mut self, c: u8) -> R<()> {
        (self.peek()? == c).then(|| self.i += 1)
    }

    /// Consumes `lit` (`null`, `true`, `false`) if it comes next.
    #[inline]
    fn eat_lit(&mut self, lit: &[u8]) -> bool {
        if self.peek() == lit.first().copied() && self.b[self.i..].starts_with(lit) {
            self.i += lit.len();
            true
        } else {
            false
        }
    }

    /// Consumes `lit` if the input continues with exactly these bytes (no whitespace).
    #[inline]
    fn eat_bytes(&mut self, lit: &[u8]) -> bool {
        let found = self.b.get(self.i..self.i + lit.len()) == Some(lit);
        if found {
            self.i += lit.len();
        }
        found
    }

    /// A string without escapes or control characters (both are left to serde).
    #[inline]
    fn str(&mut self) -> R<&'a str> {
        self.eat(b'"')?;
        let start = self.i;
        let mut end = start;
        // Eight bytes at a time up to the first '"', '\\' or control character (bit tricks
        // from "Bit Twiddling Hacks": a byte's high bit marks the first match exactly).
        const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
        const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
        let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
        while let Some(chunk) = self.b.get(end..end + 8) {
            let Ok(chunk) = <[u8; 8]>::try_from(chunk) else {
                break;
            };
            let w = u64::from_le_bytes(chunk);
            let hits = zero(w ^ (ONES * u64::from(b'"')))
                | zero(w ^ (ONES * u64::from(b'\\')))
                | (w.wrapping_sub(ONES * 0x20) & !w & HIGH);
            if hits != 0 {
                end += (hits.trailing_zeros() / 8) as usize;
                break;
            }
            end += 8;
        }
        loop {
            match *self.b.get(end)? {
                b'"' => break,
                b'\\' | 0..=0x1f => return None,
                _ => end += 1,
            }
        }
        self.i = end + 1;
        // Both ends are ASCII quotes, so on character boundaries.
        self.s.get(start..end)
    }

    /// A string, or `null` for the empty string.
    fn opt_string(&mut self) -> R<String> {
        if self.eat_lit(b"null") {
            return Some(String::new());
        }
        self.str().map(str::to_owned)
    }

    /// A non-negative integer as serde reads it into an unsigned field: digits without a
    /// leading zero, not followed by a fraction or exponent; `null` is 0.
    fn uint<T: TryFrom<u64>>(&mut self) -> R<T> {
        if self.peek()? == b'n' {
            return self.eat_lit(b"null").then(|| T::try_from(0).ok())?;
        }
        let rest = &self.b[self.i..];
        let mut v: u64 = 0;
        let mut digits = 0;
        for &c in rest {
            if !c.is_ascii_digit() {
                break;
            }
            v = v.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            digits += 1;
        }
        let leading_zero = digits > 1 && rest[0] == b'0';
        if digits == 0 || leading_zero || matches!(rest.get(digits), Some(b'.' | b'e' | b'E')) {
            return None;
        }
        self.i += digits;
        T::try_from(v).ok()
    }

    /// `true`, `false`, or `null` for false.
    fn bool(&mut self) -> R<bool> {
        if self.eat_lit(b"true") {
            Some(true)
        } else if self.eat_lit(b"false") || self.eat_lit(b"null") {
            Some(false)
        } else {
            None
        }
    }

    /// An object: `f` is called with each key, positioned at its value. `null` is an empty
    /// object when `nullable`.
    #[inline]
    fn object(&mut self, nullable: bool, mut f: impl FnMut(&mut Self, &'a str) -> R<()>) -> R<()> {
        if nullable && self.eat_lit(b"null") {
            return Some(());
        }
        self.eat(b'{')?;
        if self.peek()? == b'}' {
            self.i += 1;
            return Some(());
        }
        loop {
            let key = self.str()?;
            self.eat(b':')?;
            f(self, key)?;
            match self.peek()? {
                b',' => self.i += 1,
                b'}' => {
                    self.i += 1;
                    return Some(());
                }
                _ => return None,
            }
        }
    }

    /// An array of `f`'s elements; `null` is empty.
    fn array<T>(&mut self, mut f: impl FnMut(&mut Self) -> R<T>) -> R<Vec<T>> {
        let mut out = Vec::new();
        if self.eat_lit(b"null") {
            return Some(out);
        }
        self.eat(b'[')?;
        if self.peek()? == b']' {
            self.i += 1;
            return Some(out);
        }
        loop {
            out.push(f(self)?);
            match self.peek()? {
                b',' => self.i += 1,
                b']' => {
                    self.i += 1;
                    return Some(out);
                }
                _ => return None,
            }
        }
    }

    /// `text` as a `SmolStr`, a clone of `names[slot]` if it is the same text.
    #[inline]
    fn reuse(&mut self, slot: usize, text: &str) -> SmolStr {
        if self.names[slot] != text {
            self.names[slot] = SmolStr::new(text);
        }
        self.names[slot].clone()
    }

    /// Field bookkeeping: serde rejects a struct with a repeated field.
    #[inline]
    fn first(seen: &mut u32, bit: u32) -> R<()> {
        (*seen & bit == 0).then(|| *seen |= bit)
    }

    /// Fills `a` (default on entry) in place: building values where they end up saves
    /// copying each backend through several stack temporaries.
    fn l4addr(&mut self, a: &mut L4Addr) -> R<()> {
        // What Go writes, `{"Protocol":"TCP","Port":80}`, with the keys matched as literals;
        // anything else starts over on the general path.
        let start = self.i;
        if self.eat_bytes(b"{\"Protocol\":") {
            if let Some(text) = self.str() {
                a.protocol = self.reuse(1, text);
                if self.eat_bytes(b",\"Port\":") {
                    if let Some(port) = self.uint() {
                        if self.eat_bytes(b"}") {
                            a.port = port;
                            return Some(());
                        }
                    }
                }
            }
            self.i = start;
            *a = L4Addr::default();
        }
        let mut seen = 0;
        self.object(false, |c, key| {
            match key {
                "Protocol" => {
                    Self::first(&mut seen, 1)?;
                    if !c.eat_lit(b"null") {
                        let text = c.str()?;
                        a.protocol = c.reuse(1, text);
                    }
                }
                "Port" => {
                    Self::first(&mut seen, 2)?;
                    a.port = c.uint()?;
                }
                _ => return None,
            }
            Some(())
        })
    }

    fn ports(&mut self, p: &mut PortConfiguration) -> R<()> {
        self.object(true, |c, key| {
            p.0.push((c.reuse(0, key), L4Addr::default()));
            c.l4addr(&mut p.0.last_mut()?.1)
        })?;
        p.sort_unsorted();
        Some(())
    }

    fn addr_map(&mut self) -> R<AddrMap> {
        let mut m = AddrMap::new();
        let start = self.i;
        // Sort keys of the entries once one arrives out of order (see `sort_by_order`),
        // computed from the input where the key lies instead of from the built key.
        let mut order: Vec<(u128, usize)> = Vec::new();
        let mut last: (u128, &str) = (0, "");
        self.object(true, |c, key| {
            if m.0.len() == 16 {
                // Backends dominate a service's JSON: once a few are in, the rest of the input
                // estimates how many follow, saving the copies of growing 1k entries.
                let per_entry = (c.i - start) / 16;
                m.0.reserve(((c.b.len() - c.i) / per_entry.max(1)).min(1 << 16));
            }
            let at = key.as_ptr() as usize - c.b.as_ptr() as usize;
            let prefix = super::sort_prefix_at(c.s, at, key.len());
            if order.is_empty() {
                let ascending = m.0.is_empty() || (last.0, last.1) < (prefix, key);
                if !ascending {
                    order.reserve(m.0.capacity());
                    order.extend(
                        m.0.iter()
                            .enumerate()
                            .map(|(i, (k, _))| (super::sort_prefix(k), i)),
                    );
                }
                last = (prefix, key);
            }
            if !order.is_empty() {
                order.push((prefix, m.0.len()));
            }
            m.0.push((SmolStr::new(key), PortConfiguration::new()));
            c.ports(&mut m.0.last_mut()?.1)
        })?;
        if m.0.capacity() > m.0.len() + m.0.len() / 8 {
            m.0.shrink_to_fit();
        }
        if !order.is_empty() {
            m.sort_with(order);
        }
        Some(m)
    }

    /// `map[string]string`; values may not be `null` (serde rejects that).
    fn string_map(&mut self) -> R<BTreeMap<String, String>> {
        let mut m = BTreeMap::new();
        self.object(true, |c, key| {
            m.insert(key.to_owned(), c.str()?.to_owned());
            Some(())
        })?;
        Some(m)
    }

    fn zones(&mut self) -> R<BTreeMap<String, BackendZone>> {
        let mut m = BTreeMap::new();
        self.object(true, |c, key| {
            let mut z = BackendZone::default();
            let mut seen = 0;
            c.object(false, |c, field| {
                match field {
                    "zone" => {
                        Self::first(&mut seen, 1)?;
                        z.zone = c.opt_string()?;
                    }
                    "forZones" => {
                        Self::first(&mut seen, 2)?;
                        z.for_zones = c.array(|c| {
                            let mut f = ForZone::default();
                            let mut seen = 0;
                            c.object(false, |c, field| {
                                (field == "name").then_some(())?;
                                Self::first(&mut seen, 1)?;
                                f.name = c.opt_string()?;
                                Some(())
                            })?;
                            Some(f)
                        })?;
                    }
                    _ => return None,
                }
                Some(())
            })?;
            m.insert(key.to_owned(), z);
            Some(())
        })?;
        Some(m)
    }
}

/// Decodes `bytes` if they are in the subset described in the module docs.
pub(super) fn decode(bytes: &[u8]) -> Option<ClusterService> {
    let text = std::str::from_utf8(bytes).ok()?;
    let mut c = Cursor {
        s: text,
        b: bytes,
        i: 0,
        names: Default::default(),
    };
    let mut s = ClusterService::default();
    let mut seen = 0u32;
    c.object(false, |c, key| {
        match key {
            "cluster" => {
                Cursor::first(&mut seen, 1 << 0)?;
                s.cluster = c.opt_string()?;
            }
            "namespace" => {
                Cursor::first(&mut seen, 1 << 1)?;
                s.namespace = c.opt_string()?;
            }
            "name" => {
                Cursor::first(&mut seen, 1 << 2)?;
                s.name = c.opt_string()?;
            }
            "frontends" => {
                Cursor::first(&mut seen, 1 << 3)?;
                s.frontends = c.addr_map()?;
            }
            "backends" => {
                Cursor::first(&mut seen, 1 << 4)?;
                s.backends = c.addr_map()?;
            }
            "hostnames" => {
                Cursor::first(&mut seen, 1 << 5)?;
                s.hostnames = c.string_map()?;
            }
            "zones" => {
                Cursor::first(&mut seen, 1 << 6)?;
                s.zones = c.zones()?;
            }
            "labels" => {
                Cursor::first(&mut seen, 1 << 7)?;
                s.labels = c.string_map()?;
            }
            "selector" => {
                Cursor::first(&mut seen, 1 << 8)?;
                s.selector = c.string_map()?;
            }
            "includeExternal" => {
                Cursor::first(&mut seen, 1 << 9)?;
                s.include_external = c.bool()?;
            }
            "shared" => {
                Cursor::first(&mut seen, 1 << 10)?;
                s.shared = c.bool()?;
            }
            "clusterID" => {
                Cursor::first(&mut seen, 1 << 11)?;
                s.cluster_id = c.uint()?;
            }
            _ => return None,
        }
        Some(())
    })?;
    // serde rejects trailing characters other than whitespace.
    match c.peek() {
        None => Some(s),
        Some(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALPHA: &str = r#"{"cluster":"cluster3","namespace":"ns-alpha","name":"echo-service","frontends":{"10.96.0.10":{"http":{"Protocol":"TCP","Port":80}}},"backends":{"10.244.1.10":{"http":{"Protocol":"TCP","Port":8080}},"10.244.1.11":{"dns":{"Protocol":"UDP","Port":53},"http":{"Protocol":"TCP","Port":8080}}},"hostnames":{"10.244.1.10":"pod-a"},"zones":{"10.244.1.10":{"zone":"zone-a","forZones":[{"name":"zone-a"},{"name":"zone-b"}]},"10.244.1.11":{"zone":"zone-b"}},"labels":{},"selector":{"app":"echo"},"includeExternal":true,"shared":true,"clusterID":3}"#;

    /// Inputs in the subset whose decode must equal serde's.
    const ACCEPTED: &[&str] = &[
        ALPHA,
        r#"{}"#,
        r#" { "cluster" : null , "frontends" : null , "backends" : { "b" : null , "a" : { } } } "#,
        r#"{"backends":{"10.0.0.2":{"p":{"Port":1}},"10.0.0.1":{"z":{"Protocol":null,"Port":null},"a":{}}},"clusterID":4294967295}"#,
        r#"{"backends":{"x":{"a":{"Port":1},"a":{"Port":2}},"x":{"b":{"Port":3}},"w":{}}}"#,
        r#"{"zones":null,"hostnames":null,"labels":null,"selector":{"a":"b","a":"c"},"shared":null,"includeExternal":false}"#,
        r#"{"zones":{"a":{"forZones":null,"zone":null}}}"#,
        r#"{"backends":{"fd00::10:1234:5678:9abc:def0":{"http":{"Protocol":"TCP","Port":65535}}}}"#,
        r#"{"cluster":"é","labels":{"ключ":"値"}}"#,
        r#"{"backends":{"a":{"p":{"Protocol":"TCP","Port":1 },"q":{"Protocol":"TCP"},"r":{"Protocol":"UDP","Port":null}}}}"#,
    ];

    /// Inputs outside the subset (serde decides; some decode, some fail).
    const DECLINED: &[&str] = &[
        r#"{"extra":1}"#,
        r#"{"cluster":"a","cluster":"b"}"#,
        r#"{"cluster":"a\"b"}"#,
        r#"{"cluster":"a\u0041"}"#,
        "{\"cluster\":\"a\tb\"}",
        r#"{"clusterID":01}"#,
        r#"{"clusterID":1.0}"#,
        r#"{"clusterID":1e2}"#,
        r#"{"clusterID":-1}"#,
        r#"{"clusterID":4294967296}"#,
        r#"{"backends":{"a":{"p":{"Port":65536}}}}"#,
        r#"{"backends":{"a":{"p":null}}}"#,
        r#"{"backends":{"a":{"p":{"Port":1,"Port":2}}}}"#,
        r#"{"backends":{"a":{"p":{"Protocol":"TCP","Port":2,"Protocol":"x"}}}}"#,
        r#"{"backends":{"a":{"p":{"Protocol":"TCP","Port":2,"Other":1}}}}"#,
        r#"{"backends":{"a":{"p":{"Other":1}}}}"#,
        r#"{"labels":{"a":null}}"#,
        r#"{} x"#,
        r#"["a"]"#,
        r#"null"#,
        r#"{"cluster":"a""#,
        r#"{"cluster":"a",}"#,
        r#"{"shared":tru}"#,
    ];

    fn serde(b: &[u8]) -> Option<ClusterService> {
        serde_json::from_slice(b).ok()
    }

    #[test]
    fn accepted_inputs_decode_like_serde() {
        for text in ACCEPTED {
            let fast = decode(text.as_bytes()).unwrap_or_else(|| panic!("declined {text}"));
            assert_eq!(Some(&fast), serde(text.as_bytes()).as_ref(), "{text}");
        }
        let s = decode(ALPHA.as_bytes()).unwrap();
        assert_eq!(s.backends["10.244.1.11"]["dns"].port, 53);
        assert_eq!(s.zones["10.244.1.10"].for_zones.len(), 2);
        let dup = decode(ACCEPTED[4].as_bytes()).unwrap();
        assert_eq!(dup.backends.keys().collect::<Vec<_>>(), ["w", "x"]);
        assert_eq!(dup.backends["x"].get("b").map(|a| a.port), Some(3));
        assert!(dup.backends["x"].get("a").is_none());
    }

    #[test]
    fn declined_inputs_are_left_to_serde() {
        for text in DECLINED {
            assert!(decode(text.as_bytes()).is_none(), "accepted {text}");
        }
    }

    /// Differential check over mutations of the accepted inputs: whatever the fast path
    /// accepts, serde decodes to the same value.
    #[test]
    fn never_disagrees_with_serde() {
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x.wrapping_mul(0x2545_f491_4f6c_dd1d)
        };
        const BYTES: &[u8] = b"\"{}[]:, 0123456789nulltrueaflse\\\x7f\x1f\xc3.-eE";
        let mut accepted = 0;
        for text in ACCEPTED {
            for _ in 0..4000 {
                let mut v = text.as_bytes().to_vec();
                for _ in 0..=next() % 3 {
                    let i = (next() as usize) % (v.len() + 1);
                    let b = BYTES[(next() as usize) % BYTES.len()];
                    match next() % 3 {
                        0 if i < v.len() => v[i] = b,
                        1 if i < v.len() => {
                            v.remove(i);
                        }
                        _ => v.insert(i, b),
                    }
                }
                if let Some(fast) = decode(&v) {
                    accepted += 1;
                    let text = String::from_utf8_lossy(&v);
                    assert_eq!(Some(fast), serde(&v), "{text}");
                }
            }
        }
        assert!(accepted > 1000, "only {accepted} mutations accepted");
    }
}
