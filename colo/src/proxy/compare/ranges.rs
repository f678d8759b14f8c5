//! Half-open ranges of positions (TCP sequence space, fragment offsets): which positions are
//! covered ([`Intervals`]) and which bytes are stored at them ([`ByteMap`]).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Instant;

/// `ranges` without `holes` (both half-open).
pub(super) fn minus(mut ranges: Vec<(i64, i64)>, holes: &[(i64, i64)]) -> Vec<(i64, i64)> {
    for &(h1, h2) in holes {
        let mut next = Vec::with_capacity(ranges.len() + 1);
        for (a, b) in ranges {
            if h2 <= a || h1 >= b {
                next.push((a, b));
            } else {
                if a < h1 {
                    next.push((a, h1));
                }
                if h2 < b {
                    next.push((h2, b));
                }
            }
        }
        ranges = next;
    }
    ranges
}

/// Disjoint, merged half-open ranges.
#[derive(Debug, Default)]
pub(super) struct Intervals {
    pub(super) map: BTreeMap<i64, i64>,
}

impl Intervals {
    pub(super) fn add(&mut self, mut a: i64, mut b: i64) {
        if a >= b {
            return;
        }
        if let Some((&s, &e)) = self.map.range(..=a).next_back() {
            if e >= a {
                a = s;
                b = b.max(e);
                self.map.remove(&s);
            }
        }
        let after: Vec<(i64, i64)> = self.map.range(a..=b).map(|(&s, &e)| (s, e)).collect();
        for (s, e) in after {
            b = b.max(e);
            self.map.remove(&s);
        }
        self.map.insert(a, b);
    }

    pub(super) fn covers(&self, a: i64, b: i64) -> bool {
        a >= b
            || self
                .map
                .range(..=a)
                .next_back()
                .is_some_and(|(_, &e)| e >= b)
    }

    pub(super) fn overlapping(&self, a: i64, b: i64) -> Vec<(i64, i64)> {
        if a >= b {
            return Vec::new();
        }
        let first = self.map.range(..a).next_back().filter(|(_, &e)| e > a);
        first
            .into_iter()
            .chain(self.map.range(a..b))
            .map(|(&s, &e)| (s, e))
            .collect()
    }

    pub(super) fn max_end(&self) -> Option<i64> {
        self.map.last_key_value().map(|(_, &e)| e)
    }
}

/// Non-overlapping byte ranges keyed by their first position; what is stored first wins.
/// Pieces are views into shared buffers, so cutting one is cheap.
#[derive(Debug, Default)]
pub(super) struct ByteMap {
    map: BTreeMap<i64, Piece>,
}

#[derive(Clone, Debug)]
struct Piece {
    buf: Arc<[u8]>,
    off: usize,
    len: usize,
    since: Instant,
}

impl Piece {
    fn bytes(&self) -> &[u8] {
        self.buf.get(self.off..self.off + self.len).unwrap_or(&[])
    }

    fn end(&self, start: i64) -> i64 {
        start + self.len as i64
    }

    /// The part of this piece (stored at `start`) that covers `a..b`, which must lie inside it.
    fn cut(&self, start: i64, a: i64, b: i64) -> Piece {
        let skip = usize::try_from(a - start).unwrap_or(0);
        Piece {
            buf: self.buf.clone(),
            off: self.off + skip,
            len: usize::try_from(b - a).unwrap_or(0),
            since: self.since,
        }
    }
}

impl ByteMap {
    /// Stores the parts of `buf` (which starts at `start`) that lie in `want` and are not
    /// stored yet; returns the ranges stored.
    pub(super) fn insert(
        &mut self,
        start: i64,
        buf: &Arc<[u8]>,
        want: Vec<(i64, i64)>,
        now: Instant,
    ) -> Vec<(i64, i64)> {
        let end = start + buf.len() as i64;
        let want: Vec<(i64, i64)> = want
            .into_iter()
            .map(|(a, b)| (a.max(start), b.min(end)))
            .filter(|(a, b)| a < b)
            .collect();
        let mut stored = Vec::new();
        for (a, b) in want {
            let have = self.overlaps(a, b);
            for (g1, g2) in minus(vec![(a, b)], &have) {
                let whole = Piece {
                    buf: buf.clone(),
                    off: 0,
                    len: buf.len(),
                    since: now,
                };
                self.map.insert(g1, whole.cut(start, g1, g2));
                stored.push((g1, g2));
            }
        }
        stored
    }

    /// The stored bytes from `pos` to the end of the piece holding it.
    pub(super) fn at(&self, pos: i64) -> Option<&[u8]> {
        let (&k, p) = self.map.range(..=pos).next_back()?;
        let off = usize::try_from(pos - k).ok()?;
        p.bytes().get(off..).filter(|s| !s.is_empty())
    }

    /// The bytes of `a..b` if one piece holds them all.
    pub(super) fn slice(&self, a: i64, b: i64) -> Option<&[u8]> {
        let len = usize::try_from(b - a).ok()?;
        self.at(a).and_then(|s| s.get(..len))
    }

    /// The stored parts of `a..b`, clipped to it (each inside one piece).
    pub(super) fn overlaps(&self, a: i64, b: i64) -> Vec<(i64, i64)> {
        if a >= b {
            return Vec::new();
        }
        let first = self
            .map
            .range(..a)
            .next_back()
            .filter(|(&k, p)| p.end(k) > a);
        first
            .into_iter()
            .chain(self.map.range(a..b))
            .map(|(&k, p)| (k.max(a), p.end(k).min(b)))
            .collect()
    }

    /// Forgets `a..b`, cutting the pieces that stick out of it.
    pub(super) fn remove_range(&mut self, a: i64, b: i64) {
        if a >= b {
            return;
        }
        let keys: Vec<i64> = self
            .map
            .range(..b)
            .rev()
            .take_while(|(&k, p)| p.end(k) > a)
            .map(|(&k, _)| k)
            .collect();
        for k in keys {
            let Some(p) = self.map.remove(&k) else {
                continue;
            };
            let end = p.end(k);
            if k < a {
                self.map.insert(k, p.cut(k, k, a));
            }
            if end > b {
                self.map.insert(b, p.cut(k, b, end));
            }
        }
    }

    /// Whether `from..to` is stored without a gap.
    pub(super) fn covers(&self, from: i64, to: i64) -> bool {
        let mut at = from;
        while at < to {
            match self.at(at) {
                Some(s) => at += s.len() as i64,
                None => return false,
            }
        }
        true
    }

    /// The bytes of `from..to` (gaps, if any, as zeros).
    pub(super) fn gather(&self, from: i64, to: i64) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at = from;
        while at < to {
            let want = usize::try_from(to - at).unwrap_or(0);
            match self.at(at) {
                Some(s) => {
                    let s = &s[..s.len().min(want)];
                    out.extend_from_slice(s);
                    at += s.len() as i64;
                }
                None => {
                    out.push(0);
                    at += 1;
                }
            }
        }
        out
    }

    pub(super) fn len(&self) -> usize {
        self.map.len()
    }

    pub(super) fn oldest(&self) -> Option<Instant> {
        self.map.values().map(|p| p.since).min()
    }
}
