//! The in-memory vector index of one router: every live semantic entry of
//! the shared bucket, grouped by partition (tenant scope and everything
//! but the question that changes the answer), searched by brute force.
//!
//! Brute force over L2-normalised 384-dimension vectors is one dot product
//! per entry of the request's partition: about 0.1 ms per thousand entries
//! on one core, so it stays below the embedding's own cost (a few ms) to a
//! few tens of thousands of entries per partition. Past that an
//! approximate index (HNSW) per partition would take over.

use std::collections::HashMap;
use std::sync::Arc;

use super::guard::Features;

/// One stored prompt: its vector and what the guard compares.
#[derive(Debug, Clone)]
pub struct Item {
    /// The exact cache key of its answer (also its key in the bucket).
    pub key: String,
    /// The question it was stored for (trimmed).
    pub question: Arc<str>,
    pub vector: Arc<Vec<f32>>,
    pub features: Arc<Features>,
    /// When it expires with the bucket's TTL, in Unix milliseconds.
    pub expires_ms: u64,
}

/// A candidate above the threshold.
#[derive(Debug, Clone)]
pub struct Candidate {
    pub item: Item,
    pub similarity: f32,
}

/// Vectors by partition, bounded in total.
pub struct Index {
    /// Shared with searches in progress: a search takes the partition's
    /// `Arc` under the lock and scans it outside, and a change while one
    /// runs copies the partition (copy on write).
    partitions: HashMap<String, Arc<Vec<Item>>>,
    /// Where each key lives, to replace or remove it.
    partition_of: HashMap<String, String>,
    max_entries: usize,
}

/// What a search found.
pub struct Search {
    /// Candidates at or above the threshold, most similar first.
    pub candidates: Vec<Candidate>,
    /// The best similarity seen (above the threshold or not).
    pub best: Option<f32>,
    /// Live entries in the partition.
    pub searched: usize,
}

/// Candidates the guard is given at most: past the best few, more of the
/// same rarely agree where the best did not.
const MAX_CANDIDATES: usize = 8;

pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

impl Index {
    pub fn new(max_entries: usize) -> Self {
        Index {
            partitions: HashMap::new(),
            partition_of: HashMap::new(),
            max_entries,
        }
    }

    pub fn len(&self) -> usize {
        self.partition_of.len()
    }

    pub fn is_empty(&self) -> bool {
        self.partition_of.is_empty()
    }

    /// Adds or replaces an entry; false when the index is full of live
    /// entries (the entry is then left out until some expire).
    pub fn insert(&mut self, partition: &str, item: Item, now_ms: u64) -> bool {
        self.remove(&item.key);
        if self.len() >= self.max_entries {
            self.prune(now_ms);
            if self.len() >= self.max_entries {
                return false;
            }
        }
        self.partition_of
            .insert(item.key.clone(), partition.to_string());
        Arc::make_mut(self.partitions.entry(partition.to_string()).or_default()).push(item);
        true
    }

    pub fn remove(&mut self, key: &str) {
        let Some(partition) = self.partition_of.remove(key) else {
            return;
        };
        if let Some(items) = self.partitions.get_mut(&partition) {
            Arc::make_mut(items).retain(|i| i.key != key);
            if items.is_empty() {
                self.partitions.remove(&partition);
            }
        }
    }

    /// Drops the entries the bucket has expired (its TTL removes them
    /// without telling watchers).
    pub fn prune(&mut self, now_ms: u64) {
        let partition_of = &mut self.partition_of;
        self.partitions.retain(|_, items| {
            if items.iter().all(|i| i.expires_ms > now_ms) {
                return true;
            }
            Arc::make_mut(items).retain(|i| {
                let live = i.expires_ms > now_ms;
                if !live {
                    partition_of.remove(&i.key);
                }
                live
            });
            !items.is_empty()
        });
    }

    /// The entries of one partition, to [`search`] without the lock.
    pub fn partition(&self, partition: &str) -> Option<Arc<Vec<Item>>> {
        self.partitions.get(partition).cloned()
    }

    pub fn search(&self, partition: &str, vector: &[f32], threshold: f32, now_ms: u64) -> Search {
        search(
            self.partition(partition).as_deref().map_or(&[], |v| v),
            vector,
            threshold,
            now_ms,
        )
    }
}

/// The live entries of `items` at or above `threshold`, most similar first.
pub fn search(items: &[Item], vector: &[f32], threshold: f32, now_ms: u64) -> Search {
    let mut out = Search {
        candidates: Vec::new(),
        best: None,
        searched: 0,
    };
    for item in items.iter().filter(|i| i.expires_ms > now_ms) {
        out.searched += 1;
        let s = dot(vector, &item.vector);
        if out.best.is_none_or(|b| s > b) {
            out.best = Some(s);
        }
        if s >= threshold {
            out.candidates.push(Candidate {
                item: item.clone(),
                similarity: s,
            });
        }
    }
    out.candidates
        .sort_by(|a, b| b.similarity.total_cmp(&a.similarity));
    out.candidates.truncate(MAX_CANDIDATES);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(key: &str, v: [f32; 2], expires_ms: u64) -> Item {
        Item {
            key: key.into(),
            question: Arc::from(key),
            vector: Arc::new(v.to_vec()),
            features: Arc::new(Features::of(key)),
            expires_ms,
        }
    }

    #[test]
    fn searches_one_partition_most_similar_first() {
        let mut ix = Index::new(10);
        assert!(ix.insert("p", item("a", [1.0, 0.0], 100), 0));
        assert!(ix.insert("p", item("b", [0.6, 0.8], 100), 0));
        assert!(ix.insert("q", item("c", [1.0, 0.0], 100), 0));
        let s = ix.search("p", &[0.8, 0.6], 0.5, 0);
        let keys: Vec<_> = s.candidates.iter().map(|c| c.item.key.as_str()).collect();
        assert_eq!(keys, ["b", "a"]);
        assert_eq!(s.searched, 2, "the other partition is never searched");
        let s = ix.search("p", &[0.0, 1.0], 0.9, 0);
        assert!(s.candidates.is_empty());
        assert!((s.best.unwrap() - 0.8).abs() < 1e-6);
        assert!(ix.search("none", &[1.0, 0.0], 0.0, 0).candidates.is_empty());
    }

    #[test]
    fn a_search_in_progress_keeps_its_copy_while_the_index_changes() {
        let mut ix = Index::new(10);
        ix.insert("p", item("a", [1.0, 0.0], 100), 0);
        let held = ix.partition("p").unwrap();
        ix.insert("p", item("b", [1.0, 0.0], 100), 0);
        ix.remove("a");
        assert_eq!(search(&held, &[1.0, 0.0], 0.5, 0).candidates.len(), 1);
        assert_eq!(held[0].key, "a");
        let now: Vec<_> = ix
            .partition("p")
            .unwrap()
            .iter()
            .map(|i| i.key.clone())
            .collect();
        assert_eq!(now, ["b"]);
    }

    #[test]
    fn expires_replaces_and_stays_bounded() {
        let mut ix = Index::new(2);
        ix.insert("p", item("a", [1.0, 0.0], 100), 0);
        ix.insert("p", item("a", [0.0, 1.0], 100), 0);
        assert_eq!(ix.len(), 1, "same key replaced");
        ix.insert("p", item("b", [1.0, 0.0], 50), 0);
        assert!(!ix.insert("p", item("c", [1.0, 0.0], 100), 10), "full");
        assert_eq!(
            ix.search("p", &[1.0, 0.0], 0.9, 60).searched,
            1,
            "b expired"
        );
        assert!(ix.insert("p", item("c", [1.0, 0.0], 100), 60), "b expired");
        assert_eq!(ix.len(), 2);
        ix.remove("a");
        ix.remove("c");
        assert!(ix.is_empty());
        assert!(ix.partitions.is_empty());
    }
}
