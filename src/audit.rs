//! `stackfs debug-nonces`: every (key id, nonce) the pool's stored blocks
//! were sealed with, for tests that prove no pair is ever used twice (two
//! copies of one pool, each mounted and written in turn, must share none
//! of the pairs they wrote after the copy).

use crate::fs::{Extent, Fs, EXTENTS};
use redb::{ReadableDatabase, ReadableTable};
use stackfs_layers::{submit_wait, Buf, Op};

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// One line per sealed block: `extent INO UNIT KEYID NONCE MAC` for file
/// data (from the extent map), `slot ADDR KEYID NONCE` for metadata slots
/// (their clear header, read below the crypt layer).
pub fn nonces(fs: &Fs) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let rtx = fs.db().begin_read().map_err(|e| e.to_string())?;
    if let Ok(t) = rtx.open_table(EXTENTS) {
        for row in t.iter().map_err(|e| e.to_string())? {
            let (k, v) = row.map_err(|e| e.to_string())?;
            let (ino, unit) = k.value();
            let x = Extent::decode(v.value()).map_err(|e| format!("inode {ino}: {e}"))?;
            if x.nonce != [0; 24] {
                out.push(format!(
                    "extent {ino} {unit} {} {} {}",
                    hex(&x.nonce[12..]),
                    hex(&x.nonce[..12]),
                    hex(&x.mac)
                ));
            }
        }
    }
    // Metadata enters the stack at `meta` (crypt, when encrypted); its
    // slots' headers are read from the layer below it.
    let Some(below) = fs.stack.meta.lowers().into_iter().next() else {
        return Ok(out);
    };
    if !fs.stack.meta.name().starts_with("crypt") {
        return Ok(out);
    }
    const SLOT: u64 = 8192;
    for addr in (0..fs.geometry.meta_len).step_by(SLOT as usize) {
        let buf = Buf::zeroed(4096);
        submit_wait(&*below, Op::Read, addr, buf.clone())
            .map_err(|e| format!("reading pool address {addr}: {e}"))?;
        let b = buf.as_slice();
        if b[8..12] == *b"KID2" {
            out.push(format!("slot {addr} {} {}", hex(&b[12..24]), hex(&b[..12])));
        }
    }
    Ok(out)
}
