//! The weights' memory: as they load, the matrices move, a few tens of MB
//! at a time, into anonymous mappings that the kernel is asked to back
//! with 2 MB pages (transparent huge pages; `madvise` is the usual system
//! setting, so the request is what turns them on).
//!
//! Each decoding step reads all the weights (106 MB for SmolLM2-135M). On
//! 4 KB pages that is some 27 000 TLB misses a step, and in a virtual
//! machine each miss walks two levels of page tables; on 2 MB pages, 53.
//! On this project's 2-core VM a step's products on one thread
//! (`embedded-bench --floor`) took 4.0 ms instead of 5.7 for one sequence
//! and 6.3–7.0 instead of 11.3 for eight, against weights on glibc's 4 KB
//! pages. mimalloc, which every OptiRoute process runs, happened to put
//! most of them on huge pages by itself; this keeps it so whatever the
//! allocator does (and its steps measured about 3 % faster than with
//! mimalloc's placement alone).
//!
//! Where the mapping cannot be made, the weights stay in their vectors;
//! where the advice is refused (another OS, a kernel without transparent
//! huge pages) they are on small pages; and where huge pages are turned
//! off (`/sys/kernel/mm/transparent_hugepage/enabled` at `never`) the
//! advice is accepted and the kernel gives small pages anyway. The same
//! bytes every time, only slower.

use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::Arc;

use bytemuck::Pod;
use memmap2::{Mmap, MmapMut};

/// A huge page's size, to which the shared mapping's start is aligned.
const HUGE_PAGE: usize = 2 << 20;
/// Each matrix starts on a cache line (the interleaved groups' alignment).
const LINE: usize = 64;

/// A matrix's items: in a vector of its own (as built), or a range of the
/// weights' shared mapping (after [`pack`]).
pub enum Slab<T> {
    Owned(Vec<T>),
    Shared {
        map: Arc<Mmap>,
        /// Byte offset of the first item.
        at: usize,
        len: usize,
        item: PhantomData<T>,
    },
}

impl<T: Clone> Clone for Slab<T> {
    fn clone(&self) -> Self {
        match self {
            Slab::Owned(v) => Slab::Owned(v.clone()),
            Slab::Shared { map, at, len, .. } => Slab::Shared {
                map: Arc::clone(map),
                at: *at,
                len: *len,
                item: PhantomData,
            },
        }
    }
}

impl<T> From<Vec<T>> for Slab<T> {
    fn from(v: Vec<T>) -> Self {
        Slab::Owned(v)
    }
}

impl<T: Pod> Deref for Slab<T> {
    type Target = [T];

    fn deref(&self) -> &[T] {
        match self {
            Slab::Owned(v) => v,
            Slab::Shared { map, at, len, .. } => {
                bytemuck::cast_slice(&map[*at..*at + len * std::mem::size_of::<T>()])
            }
        }
    }
}

/// A slab of any item type, as [`pack`] moves it.
pub trait Pack {
    /// The items' bytes while the slab still owns them.
    fn owned_bytes(&self) -> Option<&[u8]>;
    /// Points the slab at its copy in `map`, from byte `at`.
    fn share(&mut self, map: &Arc<Mmap>, at: usize);
}

impl<T: Pod> Pack for Slab<T> {
    fn owned_bytes(&self) -> Option<&[u8]> {
        // Every slab starts on a cache line: an item aligned past it could
        // not be read back from the mapping.
        const { assert!(std::mem::align_of::<T>() <= LINE) };
        match self {
            Slab::Owned(v) => Some(bytemuck::cast_slice(v)),
            Slab::Shared { .. } => None,
        }
    }

    fn share(&mut self, map: &Arc<Mmap>, at: usize) {
        let len = self.len();
        *self = Slab::Shared {
            map: Arc::clone(map),
            at,
            len,
            item: PhantomData,
        };
    }
}

/// Whether the kernel backed a mapping with huge pages, as far as we
/// asked: `Advised` when the request went through (the kernel still
/// decides page by page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Paging {
    /// Nothing to move.
    #[default]
    Empty,
    Advised,
    /// Small pages: the huge-page request was refused (or not on Linux),
    /// or no mapping could be made (the weights stayed in their vectors).
    SmallPages,
}

/// Moves every slab that owns its items into one mapping, huge pages
/// asked for before any byte is written (so the pages are huge from their
/// first touch, with no later collapsing), each slab from a cache line.
/// On an error nothing has moved.
pub fn pack(slabs: &mut [&mut dyn Pack]) -> std::io::Result<Paging> {
    let mut total = 0usize;
    let mut places = Vec::with_capacity(slabs.len());
    for s in slabs.iter() {
        places.push(s.owned_bytes().map(|b| {
            let at = total.next_multiple_of(LINE);
            total = at + b.len();
            at
        }));
    }
    if total == 0 {
        return Ok(Paging::Empty);
    }
    // Room to start on a huge page wherever the mapping lands. The slack
    // is never written; only the huge page that holds the last bytes may
    // reach into it (at most 2 MB of memory a mapping).
    let mut map = MmapMut::map_anon(total + HUGE_PAGE)?;
    let base = map.as_ptr() as usize;
    let skip = base.next_multiple_of(HUGE_PAGE) - base;
    #[cfg(target_os = "linux")]
    let paging = match map.advise(memmap2::Advice::HugePage) {
        Ok(()) => Paging::Advised,
        Err(_) => Paging::SmallPages,
    };
    #[cfg(not(target_os = "linux"))]
    let paging = Paging::SmallPages;
    for (s, at) in slabs.iter().zip(&places) {
        if let (Some(b), Some(at)) = (s.owned_bytes(), at) {
            map[skip + at..skip + at + b.len()].copy_from_slice(b);
        }
    }
    let map = Arc::new(map.make_read_only()?);
    for (s, at) in slabs.iter_mut().zip(places) {
        if let Some(at) = at {
            s.share(&map, skip + at);
        }
    }
    Ok(paging)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Copy, Debug, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
    #[repr(C, align(64))]
    struct Wide {
        a: [u8; 64],
        b: [f32; 16],
    }

    /// Slabs of different item types and lengths (one empty, one already
    /// shared) read back the same items after the move, each aligned for
    /// its type, and a moved slab is not moved again.
    #[test]
    fn packed_slabs_read_back_their_items() {
        let wide: Vec<Wide> = (0..5u8)
            .map(|i| Wide {
                a: [i; 64],
                b: [f32::from(i) * 0.5; 16],
            })
            .collect();
        let bytes: Vec<u8> = (0..77u8).collect();
        let floats: Vec<f32> = (0..33).map(|i| i as f32 / 3.0).collect();
        let (mut w, mut b, mut f, mut e) = (
            Slab::from(wide.clone()),
            Slab::from(bytes.clone()),
            Slab::from(floats.clone()),
            Slab::<u32>::from(Vec::new()),
        );
        let paging = pack(&mut [&mut b, &mut w, &mut e, &mut f]).expect("mapping");
        assert_ne!(paging, Paging::Empty);
        for s in [&w as &dyn Pack, &b, &f] {
            assert!(s.owned_bytes().is_none(), "moved into the mapping");
        }
        assert_eq!(&w[..], &wide[..]);
        assert_eq!(&b[..], &bytes[..]);
        assert_eq!(&f[..], &floats[..]);
        assert!(e.is_empty());
        assert_eq!(w.as_ptr() as usize % 64, 0);
        let again = w.clone();
        assert_eq!(&again[..], &wide[..]);
        assert_eq!(pack(&mut [&mut w]).expect("nothing to move"), Paging::Empty);
        assert_eq!(&w[..], &wide[..]);
    }
}
