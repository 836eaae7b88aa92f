//! `stackfs mkfs`: create a pool on one or more devices or image files.

use super::secret::secret;
use super::{CliResult, KeyArgs, LOCK_WAIT};
use stackfs::keys::Kdf;
use stackfs::lock::{self, Mode};
use stackfs::pool::{self, uuid_str, MkfsOptions};
use stackfs_layers::{parse_size, LayerSpec, StackSpec};
use std::path::PathBuf;

#[derive(clap::Args)]
pub struct MkfsArgs {
    /// Layer stack, top first. Default: compress=zstd:1,crypt=aes-256-gcm,
    /// and stripe=64k over several devices. --layers "" for none.
    #[arg(long)]
    layers: Option<String>,
    #[command(flatten)]
    key: KeyArgs,
    /// Argon2id memory for the passphrase (e.g. 256M).
    #[arg(long, default_value = "256M")]
    kdf_memory: String,
    /// Argon2id passes.
    #[arg(long, default_value_t = 3)]
    kdf_time: u32,
    /// Stripe chunk size (multiple of 4 KiB), e.g. 64k.
    #[arg(long)]
    chunk: Option<String>,
    /// Create missing image files of this size (e.g. 1G).
    #[arg(long)]
    size: Option<String>,
    /// Overwrite devices that already hold a pool.
    #[arg(long)]
    force: bool,
    #[arg(required = true)]
    devices: Vec<PathBuf>,
}

pub fn mkfs(args: MkfsArgs) -> CliResult {
    let size = args
        .size
        .map(|s| parse_size(&s).ok_or(format!("--size {s:?} is not a size (e.g. 1G)")))
        .transpose()?;
    let spec = layer_spec(args.layers.as_deref(), args.chunk, args.devices.len())?;
    // Never format a pool that something holds (a mounted pool, fsck...).
    let existing: Vec<PathBuf> = args
        .devices
        .iter()
        .filter(|p| p.exists())
        .cloned()
        .collect();
    let _owner = lock::lock(&existing, Mode::Exclusive, LOCK_WAIT)?;
    let secret = if spec.has_crypt() {
        Some(secret(
            &args.key,
            "STACKFS_PASSPHRASE",
            true,
            "new passphrase",
        )?)
    } else {
        None
    };
    // After the secret, as it always was: the same arguments give the same first error.
    let kdf_memory = &args.kdf_memory;
    let memory_bytes = parse_size(kdf_memory)
        .filter(|m| (64 << 10..=64 << 30).contains(m))
        .ok_or(format!(
            "--kdf-memory {kdf_memory:?} must be a size from 64K to 64G"
        ))?;
    let superblock = pool::mkfs(
        &args.devices,
        &MkfsOptions {
            secret,
            kdf: Kdf {
                memory_kib: (memory_bytes >> 10) as u32,
                time: args.kdf_time.max(1),
                lanes: 1,
            },
            spec,
            size,
            force: args.force,
            progress: progress(args.devices.len()),
        },
    )?;
    println!(
        "created pool {} on {} device(s), layers \"{}\", {} MiB per device",
        uuid_str(&superblock.pool_uuid),
        superblock.count,
        superblock.spec,
        superblock.per_device >> 20
    );
    Ok(())
}

/// The stack `--layers` asks for (a default that fits the number of
/// devices without it), with `--chunk` as the stripe's chunk: the stripe
/// layer's, or a stripe added at the bottom.
fn layer_spec(layers: Option<&str>, chunk: Option<String>, devices: usize) -> CliResult<StackSpec> {
    let default = if devices > 1 {
        "compress=zstd:1,crypt=aes-256-gcm,stripe=64k"
    } else {
        "compress=zstd:1,crypt=aes-256-gcm"
    };
    let mut spec =
        StackSpec::parse(layers.unwrap_or(default)).map_err(|e| format!("--layers: {e}"))?;
    let Some(chunk) = chunk else {
        return Ok(spec);
    };
    let chunk_bytes = parse_size(&chunk)
        .filter(|c| *c > 0 && c % 4096 == 0)
        .ok_or(format!("--chunk {chunk:?} is not a multiple of 4 KiB"))?;
    let mut found = false;
    for layer in spec.layers.iter_mut() {
        if let LayerSpec::Stripe { chunk } = layer {
            *chunk = chunk_bytes;
            found = true;
        }
    }
    if !found {
        spec.layers.push(LayerSpec::Stripe { chunk: chunk_bytes });
    }
    Ok(spec)
}

/// A progress bar per device on a terminal (clearing old contents of large
/// devices takes a while); nothing otherwise.
fn progress(devices: usize) -> Box<dyn Fn(usize, u64, u64)> {
    let multi = indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::stderr());
    let style = indicatif::ProgressStyle::with_template(
        "device {prefix}: clearing [{bar:40}] {bytes}/{total_bytes}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    let bars: Vec<indicatif::ProgressBar> = (0..devices)
        .map(|i| {
            let bar = multi.add(indicatif::ProgressBar::new(0));
            bar.set_style(style.clone());
            bar.set_prefix(i.to_string());
            bar
        })
        .collect();
    Box::new(move |device, done, total| {
        if let Some(bar) = bars.get(device) {
            bar.set_length(total);
            bar.set_position(done);
            if done >= total {
                bar.finish();
            }
        }
    })
}
