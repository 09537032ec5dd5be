//! A map from LBA ranges to values where later assignments replace earlier
//! ones block by block ("newest wins").
//!
//! Invariants:
//! - extents are non-empty (`start < end`) and never overlap; a key is the
//!   extent's first block, the entry holds its exclusive end;
//! - adjacent extents may hold equal values (they are not merged: merging
//!   would cost a lookup per assignment and buys nothing for correctness);
//! - every assignment adds at most one extent per gap it fills plus at most
//!   two splits, so the number of extents stays proportional to the number of
//!   assignments still (partly) visible.
//!
//! All operations are O(log n + k), k being the number of extents touched.
//! Ranges are half-open `[start, end)` over `u64`; callers clamp `lba + blocks`
//! with `saturating_add`, so the block `u64::MAX` itself is unaddressable.

use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Extent<V> {
    end: u64,
    value: V,
}

/// Non-overlapping extents, newest assignment wins.
#[derive(Debug, Clone)]
pub(crate) struct ExtentMap<V> {
    map: BTreeMap<u64, Extent<V>>,
}

impl<V> Default for ExtentMap<V> {
    fn default() -> Self {
        Self {
            map: BTreeMap::new(),
        }
    }
}

impl<V: Clone> ExtentMap<V> {
    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Assigns `value` to the blocks of `[start, end)` whose current value
    /// `replaces` says may be replaced (blocks with no value are always
    /// filled). `displaced` is told, per replaced fragment, the old value and
    /// how many blocks it lost. Returns the number of blocks now holding
    /// `value`.
    ///
    /// `replaces` exists so that a record arriving out of seq order only fills
    /// what newer records have not already written.
    pub(crate) fn assign(
        &mut self,
        start: u64,
        end: u64,
        value: V,
        mut replaces: impl FnMut(&V) -> bool,
        mut displaced: impl FnMut(&V, u64),
    ) -> u64 {
        if start >= end {
            return 0;
        }
        // Fast path, the common case of a write to blocks nothing else holds:
        // the last extent starting before `end` is the only candidate for an
        // overlap, so one lookup decides it.
        let disjoint = match self.map.range(..end).next_back() {
            None => true,
            Some((_, ext)) => ext.end <= start,
        };
        if disjoint {
            self.map.insert(start, Extent { end, value });
            return end - start;
        }
        // Split the extents straddling the boundaries, but only the ones that
        // will actually lose blocks: splitting a kept extent would leave two
        // fragments of one value for no reason.
        let mut cursor = start;
        if let Some((&s, ext)) = self.map.range(..start).next_back() {
            if ext.end > start {
                if replaces(&ext.value) {
                    let tail = ext.clone();
                    if let Some(head) = self.map.get_mut(&s) {
                        head.end = start;
                    }
                    self.map.insert(start, tail);
                } else {
                    // The kept extent hides the head of the range.
                    cursor = ext.end.min(end);
                }
            }
        }
        if let Some((&s, ext)) = self.map.range(..end).next_back() {
            if s >= cursor && ext.end > end && replaces(&ext.value) {
                let tail = ext.clone();
                if let Some(head) = self.map.get_mut(&s) {
                    head.end = end;
                }
                self.map.insert(end, tail);
            }
        }

        let mut assigned = 0u64;
        // Start of the run of `value` being built; flushed when a kept extent
        // interrupts it, so a record gets one extent per visible gap.
        let mut run: Option<u64> = None;
        while cursor < end {
            let next = self
                .map
                .range(cursor..end)
                .next()
                .map(|(&s, e)| (s, e.end, replaces(&e.value)));
            match next {
                None => {
                    run.get_or_insert(cursor);
                    cursor = end;
                }
                Some((s, e_end, true)) => {
                    run.get_or_insert(cursor);
                    if let Some(old) = self.map.remove(&s) {
                        displaced(&old.value, e_end - s);
                    }
                    cursor = e_end;
                }
                Some((s, e_end, false)) => {
                    if s > cursor {
                        run.get_or_insert(cursor);
                    }
                    if let Some(r) = run.take() {
                        self.map.insert(
                            r,
                            Extent {
                                end: s,
                                value: value.clone(),
                            },
                        );
                        assigned += s - r;
                    }
                    cursor = e_end.min(end);
                }
            }
        }
        if let Some(r) = run {
            self.map.insert(r, Extent { end, value });
            assigned += end - r;
        }
        assigned
    }

    /// The extents covering `[start, end)`, clipped to it, if every block of
    /// the range has a value; `None` at the first hole.
    pub(crate) fn covering(&self, start: u64, end: u64) -> Option<Vec<(u64, u64, V)>> {
        let mut out = Vec::new();
        if start >= end {
            return Some(out);
        }
        // The extent holding `start` starts at or before it; stop at the
        // first hole instead of walking the rest of the range.
        let (_, first) = self.map.range(..=start).next_back()?;
        if first.end <= start {
            return None;
        }
        out.push((start, first.end.min(end), first.value.clone()));
        let mut cursor = first.end;
        if cursor >= end {
            return Some(out);
        }
        for (&s, ext) in self.map.range(cursor..end) {
            if s != cursor {
                return None;
            }
            out.push((s, ext.end.min(end), ext.value.clone()));
            cursor = ext.end;
            if cursor >= end {
                return Some(out);
            }
        }
        None
    }

    /// Removes the extents lying inside `[start, end)` whose value satisfies
    /// `pred`. Extents straddling the bounds are left alone: callers use it
    /// with a record's own range, which contains all of that record's extents.
    pub(crate) fn remove_within(&mut self, start: u64, end: u64, mut pred: impl FnMut(&V) -> bool) {
        if start >= end {
            return;
        }
        let doomed: Vec<u64> = self
            .map
            .range(start..end)
            .filter(|(_, e)| e.end <= end && pred(&e.value))
            .map(|(&s, _)| s)
            .collect();
        for s in doomed {
            self.map.remove(&s);
        }
    }

    /// Keeps only the extents for which `keep(value, blocks)` is true (a
    /// full scan, for bulk removals where walking ranges would cost more).
    pub(crate) fn retain(&mut self, mut keep: impl FnMut(&V, u64) -> bool) {
        self.map.retain(|&s, e| keep(&e.value, e.end - s));
    }

    #[cfg(test)]
    pub(crate) fn extents(&self) -> Vec<(u64, u64, V)> {
        self.map
            .iter()
            .map(|(&s, e)| (s, e.end, e.value.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn newest(m: &mut ExtentMap<u64>, s: u64, e: u64, v: u64) -> u64 {
        m.assign(s, e, v, |old| *old < v, |_, _| {})
    }

    #[test]
    fn split_and_overwrite() {
        let mut m = ExtentMap::default();
        assert_eq!(newest(&mut m, 0, 10, 1), 10);
        assert_eq!(newest(&mut m, 3, 5, 2), 2);
        assert_eq!(m.extents(), vec![(0, 3, 1), (3, 5, 2), (5, 10, 1)]);
        assert_eq!(newest(&mut m, 0, 10, 3), 10);
        assert_eq!(m.extents(), vec![(0, 10, 3)]);
    }

    #[test]
    fn out_of_order_fills_only_gaps() {
        let mut m = ExtentMap::default();
        newest(&mut m, 2, 4, 5);
        newest(&mut m, 6, 8, 6);
        let mut lost = 0;
        let got = m.assign(0, 10, 3, |old| *old < 3, |_, n| lost += n);
        assert_eq!(got, 6);
        assert_eq!(lost, 0);
        assert_eq!(
            m.extents(),
            vec![(0, 2, 3), (2, 4, 5), (4, 6, 3), (6, 8, 6), (8, 10, 3)]
        );
        // Kept extent straddling both ends: nothing assigned, nothing split.
        assert_eq!(m.assign(3, 4, 1, |old| *old < 1, |_, _| {}), 0);
        assert_eq!(m.len(), 5);
    }

    #[test]
    fn covering_detects_holes() {
        let mut m = ExtentMap::default();
        newest(&mut m, 0, 4, 1);
        newest(&mut m, 5, 9, 2);
        assert!(m.covering(0, 5).is_none());
        assert!(m.covering(3, 6).is_none());
        assert_eq!(m.covering(1, 3), Some(vec![(1, 3, 1)]));
        assert_eq!(m.covering(6, 6), Some(vec![]));
        assert!(m.covering(6, 6).is_some());
        newest(&mut m, 4, 5, 3);
        assert_eq!(
            m.covering(2, 7),
            Some(vec![(2, 4, 1), (4, 5, 3), (5, 7, 2)])
        );
    }

    #[test]
    fn extremes_do_not_overflow() {
        let mut m = ExtentMap::default();
        newest(&mut m, 0, u64::MAX, 1);
        newest(&mut m, u64::MAX - 1, u64::MAX, 2);
        assert!(m.covering(0, u64::MAX).is_some());
        assert_eq!(m.len(), 2);
    }
}
