//! Stack specs: `stripe=64k`, `fault,stripe=1m`, ... listed from the top of
//! the stack down. Layers above `stripe` see the pooled space once; layers
//! below it are made once per device. `mirror=N` groups the devices, in
//! order, into groups of N copies, a mirror over each: `stripe` above stripes
//! over the groups (`stripe=64k,mirror=2` over 4 devices is RAID-10), and
//! with one group no stripe is needed (`mirror=2` over 2 devices, RAID-1).
//! Filters below the mirror are made per member, each under its own watchdog.

use crate::bay::Bay;
use crate::compress::{Codec, Compress};
use crate::crypt::{Crypt, KeyId, Keyring};
use crate::device::Device;
use crate::fault::{Fault, FaultControl};
use crate::layer::{Counted, Layer};
use crate::mirror::{Mirror, MAX_COPIES};
use crate::stripe::Stripe;
use crate::watchdog::{Health, Watchdog};
use std::fmt;
use std::sync::Arc;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("unknown layer {0:?} (known: compress, crypt, stripe, mirror, fault)")]
    UnknownLayer(String),
    #[error("layer {layer}: {why}")]
    BadParam { layer: String, why: String },
    #[error("layer {0} appears twice")]
    Duplicate(String),
    #[error("{0}")]
    Shape(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LayerSpec {
    Compress(Codec),
    Crypt,
    Stripe {
        chunk: u64,
    },
    /// N copies of each member's data: the devices, in order, make groups of N.
    Mirror {
        copies: usize,
    },
    Fault,
}

impl LayerSpec {
    fn kind(&self) -> &'static str {
        match self {
            LayerSpec::Compress(_) => "compress",
            LayerSpec::Crypt => "crypt",
            LayerSpec::Stripe { .. } => "stripe",
            LayerSpec::Mirror { .. } => "mirror",
            LayerSpec::Fault => "fault",
        }
    }
}

impl fmt::Display for LayerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayerSpec::Compress(Codec::Lz4) => write!(f, "compress=lz4"),
            LayerSpec::Compress(Codec::Zstd(l)) => write!(f, "compress=zstd:{l}"),
            LayerSpec::Crypt => write!(f, "crypt=aes-256-gcm"),
            LayerSpec::Stripe { chunk } => write!(f, "stripe={}", format_size(*chunk)),
            LayerSpec::Mirror { copies } => write!(f, "mirror={copies}"),
            LayerSpec::Fault => write!(f, "fault"),
        }
    }
}

/// A parsed stack, top first.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StackSpec {
    pub layers: Vec<LayerSpec>,
}

impl fmt::Display for StackSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let parts: Vec<String> = self.layers.iter().map(|l| l.to_string()).collect();
        write!(f, "{}", parts.join(","))
    }
}

/// `4096`, `64k`, `1m`, `2g` (binary units).
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim().to_ascii_lowercase();
    let s = s
        .strip_suffix("ib")
        .or_else(|| s.strip_suffix('b'))
        .unwrap_or(&s);
    let (num, mult) = match s.chars().last()? {
        'k' => (&s[..s.len() - 1], 1u64 << 10),
        'm' => (&s[..s.len() - 1], 1 << 20),
        'g' => (&s[..s.len() - 1], 1 << 30),
        't' => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

pub fn format_size(n: u64) -> String {
    for (unit, shift) in [("g", 30), ("m", 20), ("k", 10)] {
        if n >= 1 << shift && n % (1 << shift) == 0 {
            return format!("{}{unit}", n >> shift);
        }
    }
    n.to_string()
}

impl StackSpec {
    pub fn parse(s: &str) -> Result<StackSpec, SpecError> {
        let mut layers = Vec::new();
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (name, param) = match part.split_once('=') {
                Some((n, p)) => (n.trim(), Some(p.trim())),
                None => (part, None),
            };
            let layer = match name {
                "stripe" => {
                    let p = param
                        .ok_or_else(|| bad("stripe", "needs a chunk size, e.g. stripe=64k"))?;
                    let chunk = parse_size(p)
                        .ok_or_else(|| bad("stripe", format!("chunk size {p:?} is not a size")))?;
                    if chunk == 0 || chunk % 4096 != 0 {
                        return Err(bad(
                            "stripe",
                            format!("chunk size {p} is not a multiple of 4 KiB"),
                        ));
                    }
                    LayerSpec::Stripe { chunk }
                }
                "mirror" => parse_mirror(param)?,
                "compress" => LayerSpec::Compress(match param.unwrap_or("zstd") {
                    "lz4" => Codec::Lz4,
                    "zstd" => Codec::Zstd(1),
                    p => {
                        let level = p.strip_prefix("zstd:").and_then(|l| l.parse::<i32>().ok());
                        match level {
                            Some(l) if (-7..=22).contains(&l) && l != 0 => Codec::Zstd(l),
                            _ => return Err(bad("compress", format!("{p:?}: use lz4, zstd or zstd:LEVEL (1..22, or -7..-1 for fast)"))),
                        }
                    }
                }),
                "crypt" => match param.unwrap_or("aes-256-gcm") {
                    "aes-256-gcm" => LayerSpec::Crypt,
                    p => {
                        return Err(bad(
                            "crypt",
                            format!("cipher {p:?} is not supported (use aes-256-gcm)"),
                        ))
                    }
                },
                "fault" => {
                    if let Some(p) = param {
                        return Err(bad(
                            "fault",
                            format!("takes no parameter (got {p:?}); steer it at run time"),
                        ));
                    }
                    LayerSpec::Fault
                }
                other => return Err(SpecError::UnknownLayer(other.to_string())),
            };
            if layers
                .iter()
                .any(|l: &LayerSpec| l.kind() == layer.kind() && l.kind() != "fault")
            {
                return Err(SpecError::Duplicate(layer.kind().into()));
            }
            layers.push(layer);
        }
        let pos = |k: &str| layers.iter().position(|l| l.kind() == k);
        if let (Some(c), Some(e)) = (pos("compress"), pos("crypt")) {
            if c > e {
                return Err(SpecError::Shape(
                    "compress must come before (above) crypt: encrypted bytes do not compress"
                        .into(),
                ));
            }
        }
        if let Some(st) = pos("stripe") {
            for k in ["compress", "crypt"] {
                if pos(k).is_some_and(|i| i > st) {
                    return Err(SpecError::Shape(format!(
                        "{k} must come before (above) stripe: it changes request lengths, which striping maps 1:1"
                    )));
                }
            }
        }
        if let Some(mirror) = pos("mirror") {
            for k in ["stripe", "compress", "crypt"] {
                if pos(k).is_some_and(|i| i > mirror) {
                    return Err(SpecError::Shape(format!(
                        "mirror must come below {k}: it keeps copies of the bytes as stored, \
                         so it is the lowest of stripe, crypt and compress"
                    )));
                }
            }
        }
        Ok(StackSpec { layers })
    }

    pub fn chunk(&self) -> Option<u64> {
        self.layers.iter().find_map(|l| match l {
            LayerSpec::Stripe { chunk } => Some(*chunk),
            _ => None,
        })
    }

    pub fn has_crypt(&self) -> bool {
        self.layers.contains(&LayerSpec::Crypt)
    }

    /// Build the stack over opened devices (in pool order). Every layer is
    /// wrapped in the framework's counters. A crypt layer needs `keys`.
    pub fn build(&self, devices: Vec<Arc<Device>>) -> Result<Stack, SpecError> {
        self.build_with(devices, None, None)
    }

    /// With a `timeout`, a watchdog above each device fails requests that
    /// take longer with EIO at once and marks the member faulted in
    /// `Stack::health` (see watchdog.rs).
    pub fn build_with(
        &self,
        devices: Vec<Arc<Device>>,
        keys: Option<&CryptKeys>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Stack, SpecError> {
        let leaves = devices.into_iter().map(Leaf::Device).collect();
        self.build_leaves(leaves, keys, timeout)
    }

    /// Build over the pool's members in pool order, some of which may be
    /// missing (a degraded mount): a missing member needs a mirror, sits in
    /// an empty bay and is marked missing in `Stack::health`.
    pub fn build_leaves(
        &self,
        leaves: Vec<Leaf>,
        keys: Option<&CryptKeys>,
        timeout: Option<std::time::Duration>,
    ) -> Result<Stack, SpecError> {
        if self.has_crypt() && keys.is_none() {
            return Err(SpecError::Shape(
                "the crypt layer needs the pool's key".into(),
            ));
        }
        let shape = self.shape(leaves.len())?;
        let missing: Vec<usize> = (0..leaves.len())
            .filter(|&i| matches!(leaves[i], Leaf::Missing { .. }))
            .collect();
        if !missing.is_empty() && shape.mirror_at.is_none() {
            return Err(SpecError::Shape(
                "a member is missing and the pool keeps one copy of its data (no mirror)".into(),
            ));
        }
        // One control for every fault layer: a power cut is pool-wide.
        let fault = self
            .layers
            .contains(&LayerSpec::Fault)
            .then(FaultControl::new);
        let health = Health::new(leaves.iter().map(Leaf::name).collect());
        let (members, bays) = self.members(leaves, &shape, &fault, &health, timeout);
        let mut groups = self.groups(members, &shape, &fault, &health)?;
        for i in missing {
            health.mark_missing(i);
        }
        let mut top = match shape.stripe_at.map(|i| &self.layers[i]) {
            Some(LayerSpec::Stripe { chunk }) => {
                Counted::wrap(Arc::new(Stripe::new(*chunk, groups)?))
            }
            _ => groups.pop().expect("one group"),
        };
        let mut meta = None;
        for spec in self.layers[..shape.pooled_at].iter().rev() {
            top = match spec {
                LayerSpec::Compress(codec) => {
                    // Metadata is not compressed: it enters the stack below here.
                    meta = Some(top.clone());
                    Counted::wrap(Arc::new(Compress::new(top, *codec)))
                }
                LayerSpec::Crypt => {
                    let k = keys.expect("checked above");
                    Counted::wrap(Arc::new(Crypt::new(top, k.keyring.clone(), k.write_key)))
                }
                _ => self.make_filter(spec, top, &fault, None),
            };
        }
        let meta = meta.unwrap_or_else(|| top.clone());
        Ok(Stack {
            top,
            meta,
            fault,
            health,
            bays,
        })
    }

    /// Copies kept of every byte: N under `mirror=N`, else 1.
    pub fn copies(&self) -> usize {
        self.layers
            .iter()
            .find_map(|l| match l {
                LayerSpec::Mirror { copies } => Some(*copies),
                _ => None,
            })
            .unwrap_or(1)
    }

    /// Whether the stack can be built over `devices` devices (mirror
    /// groups, a stripe to pool several), without building it.
    pub fn check_devices(&self, devices: usize) -> Result<(), SpecError> {
        self.shape(devices).map(|_| ())
    }

    /// Where the stack pools and copies, checked against the device count.
    fn shape(&self, devices: usize) -> Result<Shape, SpecError> {
        if devices == 0 {
            return Err(SpecError::Shape("no devices".into()));
        }
        let at = |kind: &str| self.layers.iter().position(|l| l.kind() == kind);
        let (stripe_at, mirror_at) = (at("stripe"), at("mirror"));
        let copies = self.copies();
        if !devices.is_multiple_of(copies) {
            return Err(SpecError::Shape(format!(
                "{devices} devices do not make groups of {copies} for mirror={copies} \
                 (give a multiple of {copies})"
            )));
        }
        let groups = devices / copies;
        if stripe_at.is_none() && groups > 1 {
            return Err(SpecError::Shape(if copies > 1 {
                format!(
                    "{devices} devices make {groups} mirror groups but no stripe layer \
                     pools them (add e.g. stripe=64k above mirror={copies})"
                )
            } else {
                format!("{devices} devices but no stripe layer to pool them (add e.g. stripe=64k)")
            }));
        }
        let len = self.layers.len();
        Ok(Shape {
            stripe_at,
            mirror_at,
            copies,
            pooled_at: stripe_at.or(mirror_at).unwrap_or(len),
            member_at: mirror_at.or(stripe_at).unwrap_or(len),
        })
    }

    /// Each device with the filters below the pooling layers and, with a
    /// `timeout`, a watchdog naming the member it faults.
    /// Below a mirror, each device sits in a bay (see bay.rs); the bays are
    /// returned too.
    fn members(
        &self,
        leaves: Vec<Leaf>,
        shape: &Shape,
        fault: &Option<Arc<FaultControl>>,
        health: &Arc<Health>,
        timeout: Option<std::time::Duration>,
    ) -> (Vec<Arc<dyn Layer>>, Vec<Arc<Bay>>) {
        let mut members = Vec::with_capacity(leaves.len());
        let mut bays = Vec::new();
        for (i, leaf) in leaves.into_iter().enumerate() {
            let name = leaf.name();
            let (device, capacity): (Option<Arc<dyn Layer>>, u64) = match leaf {
                Leaf::Device(dev) => {
                    let capacity = dev.capacity();
                    (Some(Counted::wrap(dev)), capacity)
                }
                Leaf::Missing { capacity, .. } => (None, capacity),
            };
            let mut l: Arc<dyn Layer> = match (shape.mirror_at, device) {
                (None, Some(device)) => device,
                (_, device) => {
                    let bay = Bay::new(device, capacity, name);
                    bays.push(bay.clone());
                    bay
                }
            };
            for spec in self.layers[shape.member_at..].iter().rev() {
                l = self.make_filter(spec, l, fault, Some(i));
            }
            if let Some(t) = timeout {
                l = Counted::wrap(Watchdog::new(l, t, i, health.clone()));
            }
            members.push(l);
        }
        (members, bays)
    }

    /// The members in groups of `copies`, a mirror over each (with the
    /// filters between stripe and mirror); without a mirror, the members.
    fn groups(
        &self,
        members: Vec<Arc<dyn Layer>>,
        shape: &Shape,
        fault: &Option<Arc<FaultControl>>,
        health: &Arc<Health>,
    ) -> Result<Vec<Arc<dyn Layer>>, SpecError> {
        let Some(mirror_at) = shape.mirror_at else {
            return Ok(members);
        };
        let between = shape.stripe_at.map_or(mirror_at, |s| s + 1)..mirror_at;
        let mut groups = Vec::new();
        let mut indices = Vec::new();
        let mut members = members.into_iter().enumerate().peekable();
        while members.peek().is_some() {
            let (ids, copies): (Vec<usize>, Vec<_>) = members.by_ref().take(shape.copies).unzip();
            let mut group = Counted::wrap(Mirror::new(copies, ids.clone(), health.clone())?);
            for spec in self.layers[between.clone()].iter().rev() {
                group = self.make_filter(spec, group, fault, None);
            }
            groups.push(group);
            indices.push(ids);
        }
        health.set_groups(indices);
        Ok(groups)
    }

    fn make_filter(
        &self,
        spec: &LayerSpec,
        lower: Arc<dyn Layer>,
        fault: &Option<Arc<FaultControl>>,
        device: Option<usize>,
    ) -> Arc<dyn Layer> {
        match (spec, fault) {
            (LayerSpec::Fault, Some(ctl)) => Counted::wrap(Fault::new(lower, ctl.clone(), device)),
            // Only filters are instantiated per device; the others are placed by
            // `build_with` (and the parser keeps them above stripe).
            _ => lower,
        }
    }
}

fn parse_mirror(param: Option<&str>) -> Result<LayerSpec, SpecError> {
    let p = param.ok_or_else(|| bad("mirror", "needs a copy count, e.g. mirror=2"))?;
    match p.parse::<usize>() {
        Ok(copies) if (2..=MAX_COPIES).contains(&copies) => Ok(LayerSpec::Mirror { copies }),
        _ => Err(bad(
            "mirror",
            format!("{p:?} copies: a mirror keeps 2 to {MAX_COPIES} copies"),
        )),
    }
}

fn bad(layer: &str, why: impl Into<String>) -> SpecError {
    SpecError::BadParam {
        layer: layer.into(),
        why: why.into(),
    }
}

/// Where a spec pools and copies its devices (indices into its layers).
struct Shape {
    stripe_at: Option<usize>,
    mirror_at: Option<usize>,
    /// Copies per mirror group (1: no mirror).
    copies: usize,
    /// Layers above this index are made once, over the pooled space.
    pooled_at: usize,
    /// Layers from this index down are made once per member.
    member_at: usize,
}

/// What the crypt layer needs: the pool's keys, and the key id this mount
/// writes with (fresh and random for every read-write mount; None read-only).
pub struct CryptKeys {
    pub keyring: Arc<Keyring>,
    pub write_key: Option<KeyId>,
}

/// A built stack: its top layer (file data), the layer metadata enters
/// (below compression), and the switch shared by its fault layers.
pub struct Stack {
    pub top: Arc<dyn Layer>,
    pub meta: Arc<dyn Layer>,
    pub fault: Option<Arc<FaultControl>>,
    /// Which members answer (the watchdogs mark the ones that stop).
    pub health: Arc<crate::watchdog::Health>,
    /// Each member's bay, in pool order, when the stack mirrors (empty
    /// otherwise): where `replace` puts a new device.
    pub bays: Vec<Arc<Bay>>,
}

/// One member of a pool to build a stack over.
pub enum Leaf {
    Device(Arc<Device>),
    /// Not there (a degraded mount): `capacity` bytes of the pool's space.
    Missing {
        name: String,
        capacity: u64,
    },
}

impl Leaf {
    fn name(&self) -> String {
        match self {
            Leaf::Device(d) => d.path().display().to_string(),
            Leaf::Missing { name, .. } => name.clone(),
        }
    }
}

impl Stack {
    /// Copies kept of every byte (`mirror=N`: N; 1 without a mirror), as
    /// the stack was built (from its mirror groups in `health`).
    pub fn copies(&self) -> usize {
        self.health.copies()
    }
}

/// Every node of the stack, top first, with its depth.
pub fn walk(top: &Arc<dyn Layer>) -> Vec<(usize, Arc<dyn Layer>)> {
    let mut out = Vec::new();
    let mut todo = vec![(0usize, top.clone())];
    while let Some((d, l)) = todo.pop() {
        for lower in l.lowers().into_iter().rev() {
            todo.push((d + 1, lower));
        }
        out.push((d, l));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        let s = StackSpec::parse("fault, stripe=64k").unwrap();
        assert_eq!(
            s.layers,
            vec![LayerSpec::Fault, LayerSpec::Stripe { chunk: 65536 }]
        );
        assert_eq!(s.to_string(), "fault,stripe=64k");
        assert_eq!(StackSpec::parse("").unwrap().layers, vec![]);
    }

    #[test]
    fn rejects_bad_specs() {
        assert!(matches!(
            StackSpec::parse("stripe=3k"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("stripe=abc"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("stripe"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("stripe=0"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("raid5=64k"),
            Err(SpecError::UnknownLayer(_))
        ));
        assert!(matches!(
            StackSpec::parse("stripe=64k,stripe=1m"),
            Err(SpecError::Duplicate(_))
        ));
        assert!(matches!(
            StackSpec::parse("fault=1"),
            Err(SpecError::BadParam { .. })
        ));
    }

    #[test]
    fn transform_layers_and_their_order() {
        assert!(matches!(
            StackSpec::parse("crypt,compress=lz4"),
            Err(SpecError::Shape(_))
        ));
        assert!(matches!(
            StackSpec::parse("stripe=64k,crypt"),
            Err(SpecError::Shape(_))
        ));
        assert!(matches!(
            StackSpec::parse("compress=zstd:99"),
            Err(SpecError::BadParam { .. })
        ));
        assert!(matches!(
            StackSpec::parse("crypt=rot13"),
            Err(SpecError::BadParam { .. })
        ));
        let full = StackSpec::parse("compress=zstd:3,crypt=aes-256-gcm,stripe=64k").unwrap();
        assert_eq!(
            full.to_string(),
            "compress=zstd:3,crypt=aes-256-gcm,stripe=64k"
        );
        assert_eq!(
            StackSpec::parse("compress,crypt").unwrap().to_string(),
            "compress=zstd:1,crypt=aes-256-gcm"
        );
        assert!(StackSpec::parse("compress=lz4,stripe=64k")
            .unwrap()
            .build_with(vec![], None, None)
            .is_err());
    }

    #[test]
    fn mirror_specs_and_their_refusals() {
        let raid10 = "compress=zstd:1,crypt=aes-256-gcm,stripe=64k,mirror=2";
        let spec = StackSpec::parse(raid10).unwrap();
        assert_eq!(spec.layers[3], LayerSpec::Mirror { copies: 2 });
        assert_eq!(spec.to_string(), raid10);
        assert!(StackSpec::parse("fault,stripe=1m,fault,mirror=32,fault").is_ok());
        for bad_count in ["mirror", "mirror=1", "mirror=0", "mirror=33", "mirror=two"] {
            assert!(
                matches!(StackSpec::parse(bad_count), Err(SpecError::BadParam { .. })),
                "{bad_count}"
            );
        }
        for (spec, below) in [
            ("mirror=2,stripe=64k", "stripe"),
            ("mirror=2,crypt", "crypt"),
            ("compress,mirror=2,crypt", "crypt"),
            ("mirror=2,compress=lz4", "compress"),
        ] {
            match StackSpec::parse(spec) {
                Err(SpecError::Shape(why)) => {
                    assert!(why.contains(&format!("below {below}")), "{spec}: {why}")
                }
                other => panic!("{spec}: {other:?}"),
            }
        }
        assert_eq!(
            StackSpec::parse("mirror=2,mirror=3"),
            Err(SpecError::Duplicate("mirror".into()))
        );
    }

    #[test]
    fn device_counts_a_mirror_refuses() {
        let why = |spec: &str, devices: usize| match StackSpec::parse(spec).unwrap().shape(devices)
        {
            Err(SpecError::Shape(why)) => why,
            other => panic!("{spec} over {devices}: {:?}", other.map(|s| s.copies)),
        };
        assert!(why("stripe=64k,mirror=2", 3).contains("do not make groups of 2"));
        assert!(why("mirror=3", 6).contains("no stripe layer"));
        assert!(why("mirror=2", 0).contains("no devices"));
        let raid1 = StackSpec::parse("compress,crypt,mirror=2").unwrap();
        let shape = raid1.shape(2).unwrap();
        assert_eq!((shape.copies, shape.pooled_at, shape.member_at), (2, 2, 2));
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("64k"), Some(65536));
        assert_eq!(parse_size("1MiB"), Some(1 << 20));
        assert_eq!(parse_size("12x"), None);
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("2g"), Some(2 << 30));
        assert_eq!(parse_size("99999999999999999999t"), None);
        assert_eq!(format_size(65536), "64k");
    }
}
