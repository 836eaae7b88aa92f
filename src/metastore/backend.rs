//! The redb `StorageBackend`: byte ranges over buffered or stored sectors.

use super::ondisk::{Ver, MAX_TABLES, PER_TABLE, SECTOR};
use super::{eio, Format, MetaStore, State, MAX_DIRTY};
use std::io;
use std::sync::atomic::Ordering;

impl MetaStore {
    /// The on-disk bytes of sectors that are not buffered.
    fn fetch(&self, st: &State, sectors: &[u64]) -> io::Result<Vec<Box<[u8]>>> {
        let zeros = || vec![0u8; SECTOR].into_boxed_slice();
        if st.format == Format::LegacyReadOnly {
            let found = self.legacy_load(sectors, &mut 0)?;
            return Ok(found
                .into_iter()
                .map(|f| f.map_or_else(zeros, |(_, p)| p))
                .collect());
        }
        let want: Vec<(u64, Ver)> = sectors
            .iter()
            .map(|&s| (s, Self::version(st, s)))
            .filter(|(_, v)| !v.is_none())
            .collect();
        let mut got = self.read_versions(&want)?.into_iter();
        Ok(sectors
            .iter()
            .map(|&s| match Self::version(st, s).is_none() {
                true => zeros(),
                false => got.next().unwrap_or_else(zeros),
            })
            .collect())
    }

    /// The current bytes of sectors (buffered or on disk), loading in one batch.
    fn sectors(&self, st: &State, first: u64, count: u64) -> io::Result<Vec<Box<[u8]>>> {
        let wanted: Vec<u64> = (first..first + count)
            .filter(|s| !st.dirty.contains_key(s))
            .collect();
        let mut loaded = self.fetch(st, &wanted)?.into_iter();
        let mut out = Vec::with_capacity(count as usize);
        for s in first..first + count {
            out.push(match st.dirty.get(&s) {
                Some(Some(d)) => d.clone(),
                Some(None) => vec![0u8; SECTOR].into_boxed_slice(),
                None => loaded.next().expect("one per sector not buffered"),
            });
        }
        Ok(out)
    }
}

impl redb::StorageBackend for MetaStore {
    fn len(&self) -> Result<u64, io::Error> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        let st = self.state.lock();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|e| *e <= st.len)
            .ok_or_else(|| eio("read past the end"))?;
        if out.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR as u64;
        let last = (end - 1) / SECTOR as u64;
        let secs = self.sectors(&st, first, last - first + 1)?;
        let mut done = 0usize;
        for (i, sec) in secs.iter().enumerate() {
            let base = (first + i as u64) * SECTOR as u64;
            let from = (offset + done as u64 - base) as usize;
            let n = (SECTOR - from).min(out.len() - done);
            out[done..done + n].copy_from_slice(&sec[from..from + n]);
            done += n;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut st = self.state.lock();
        let max = self.max_len(&st);
        if len > max {
            self.watch.refused.store(true, Ordering::Release);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!(
                    "metadata store full: {len} bytes asked, at most {max} \
                     (the region's size, or the version table's limit of {} bytes)",
                    MAX_TABLES as u64 * PER_TABLE * SECTOR as u64
                ),
            ));
        }
        let sec = SECTOR as u64;
        if len > st.len {
            // New positions must read as zeros, also where an old, longer store left bytes.
            if !st.len.is_multiple_of(sec) {
                let s = st.len / sec;
                let cut = (st.len % sec) as usize;
                let mut bytes = self.sectors(&st, s, 1)?.pop().expect("one sector");
                bytes[cut..].fill(0);
                st.dirty.insert(s, Some(bytes));
            }
            for s in st.len.div_ceil(sec)..len.min(st.high).div_ceil(sec) {
                st.dirty.insert(s, None);
            }
        } else if st.format != Format::LegacyReadOnly {
            // Whole sectors cut off lose their version (they read as zeros).
            for s in len.div_ceil(sec)..st.len.div_ceil(sec) {
                if st.dirty.contains_key(&s) || !Self::version(&st, s).is_none() {
                    st.dirty.insert(s, None);
                }
            }
        }
        st.len = len;
        self.watch.len.store(len, Ordering::Release);
        st.high = match st.format {
            Format::LegacyReadOnly => st.high.max(len),
            _ => len,
        };
        Ok(())
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        if !self.may_write() {
            return Ok(());
        }
        let mut st = self.state.lock();
        self.write_out(&mut st, true)
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut st = self.state.lock();
        let end = offset
            .checked_add(data.len() as u64)
            .filter(|e| *e <= st.len)
            .ok_or_else(|| eio("write past the end"))?;
        if data.is_empty() {
            return Ok(());
        }
        let first = offset / SECTOR as u64;
        let last = (end - 1) / SECTOR as u64;
        // Only partially covered sectors need their old bytes.
        let mut done = 0usize;
        for s in first..=last {
            let base = s * SECTOR as u64;
            let from = (offset + done as u64 - base) as usize;
            let n = (SECTOR - from).min(data.len() - done);
            let mut sec = if n == SECTOR {
                vec![0u8; SECTOR].into_boxed_slice()
            } else {
                self.sectors(&st, s, 1)?.pop().expect("one sector")
            };
            sec[from..from + n].copy_from_slice(&data[done..done + n]);
            st.dirty.insert(s, Some(sec));
            done += n;
        }
        if st.dirty.len() > MAX_DIRTY && self.may_write() {
            self.write_out(&mut st, false)?;
        }
        Ok(())
    }
}
