//! Sketch updates between two flushes of the state batch.
//!
//! Events fold into in-memory sketches keyed by their encoded key; a flush
//! reads each dirty key's stored sketch, unions the delta into it, and hands
//! back `(key, bytes)` pairs for the same atomic batch as the Kafka offsets.

use std::collections::HashMap;

use chrono::NaiveDate;

use super::hll::{HashVersion, Precision, Sketch};
use super::key::{
    for_each_event_key, value_for, write_finest_key, Dimensions, SketchKey, MAX_DIMENSIONS,
    MISSING_VALUE,
};
use super::query::{SketchConfig, SketchSource};
use super::union::Union;
use super::SketchError;

/// `(key, value)` bytes to put into the state batch.
pub type SketchWrite = (Vec<u8>, Vec<u8>);

/// Pending sketch deltas, keyed by encoded [`SketchKey`].
///
/// An event's 12 keys (with the default 4 dimensions) all follow from its
/// date and combination of values, so the buffer resolves them once per
/// combination: an event then costs one key encoding, one lookup and one
/// insert per sketch.
#[derive(Debug)]
pub struct SketchBuffer {
    dims: Dimensions,
    precision: Precision,
    /// Dirty sketches with their keys, in first-touched order. A [`Union`]
    /// takes an insert in a few nanoseconds where the crate's sparse mode
    /// re-encodes its list every 33 inserts.
    slots: Vec<(Vec<u8>, Union)>,
    /// Key → index into `slots`.
    index: HashMap<Vec<u8>, usize>,
    /// Finest key of an (date, combination) → slots of all its event keys.
    combos: HashMap<Vec<u8>, Box<[usize]>>,
    /// Reused for key bytes.
    key_buf: Vec<u8>,
}

impl SketchBuffer {
    /// An empty buffer for the configured dimensions and precision.
    pub fn new(cfg: &SketchConfig) -> Self {
        SketchBuffer {
            dims: cfg.dimensions.clone(),
            precision: cfg.precision,
            slots: Vec::new(),
            index: HashMap::new(),
            combos: HashMap::new(),
            key_buf: Vec::with_capacity(128),
        }
    }

    /// One telemetry event of `client_id` active on `date` with these
    /// dimension values (see [`Dimensions::values_of`]): updates every
    /// sketch of [`super::keys_for_event`].
    pub fn record_activity(&mut self, date: NaiveDate, client_id: &str, dims: &[(&str, &str)]) {
        let h = HashVersion::CURRENT.hash_client(client_id);
        let mut values = [MISSING_VALUE; MAX_DIMENSIONS];
        let n = self.dims.names().len();
        for (slot, name) in values.iter_mut().zip(self.dims.names()) {
            *slot = value_for(dims, name);
        }
        let values = &values[..n];
        write_finest_key(&self.dims, date, values, &mut self.key_buf);
        if !self.combos.contains_key(self.key_buf.as_slice()) {
            let finest = self.key_buf.clone();
            let mut slots = Vec::with_capacity(2 + n + n * n / 2);
            let SketchBuffer {
                dims: cfg_dims,
                precision,
                slots: all,
                index,
                key_buf,
                ..
            } = self;
            for_each_event_key(cfg_dims, date, values, key_buf, |key| {
                slots.push(slot_of(all, index, *precision, key));
            });
            self.combos.insert(finest.clone(), slots.into_boxed_slice());
            self.key_buf = finest;
        }
        for &i in self.combos[self.key_buf.as_slice()].iter() {
            insert(&mut self.slots[i].1, h);
        }
    }

    /// `client_id` reported `experiment = branch` on `date`.
    pub fn record_branch(
        &mut self,
        date: NaiveDate,
        client_id: &str,
        experiment: &str,
        branch: &str,
    ) {
        let h = HashVersion::CURRENT.hash_client(client_id);
        self.key_buf.clear();
        SketchKey::branch(date, experiment, branch).encode_into(&mut self.key_buf);
        let i = slot_of(
            &mut self.slots,
            &mut self.index,
            self.precision,
            &self.key_buf,
        );
        insert(&mut self.slots[i].1, h);
    }

    /// Number of dirty sketches (a flush trigger).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when nothing is pending.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// For every dirty key, the stored sketch (read from `stored`) unioned
    /// with the pending delta, encoded, sorted by key: the writes for the
    /// state batch. Leaves the buffer as it is; call [`SketchBuffer::clear`]
    /// once the batch is durable, so a failed write loses nothing.
    pub fn prepare_flush(
        &mut self,
        stored: &dyn SketchSource,
    ) -> Result<Vec<SketchWrite>, SketchError> {
        let mut out = Vec::with_capacity(self.slots.len());
        for (key, delta) in self.slots.iter_mut() {
            let mut union = delta.clone();
            if let Some(existing) = stored.get(key)? {
                union.add_bytes(&existing).map_err(|e| match e {
                    SketchError::Corrupt(why) => {
                        let shown = SketchKey::decode(key)
                            .map_or_else(|_| format!("{key:02x?}"), |k| k.to_string());
                        SketchError::Corrupt(format!("stored sketch {shown}: {why}"))
                    }
                    other => other,
                })?;
            }
            out.push((key.clone(), union.finish().to_bytes()));
        }
        out.sort_unstable();
        Ok(out)
    }

    /// Drops every pending delta (after a successful flush).
    pub fn clear(&mut self) {
        self.slots.clear();
        self.index.clear();
        self.combos.clear();
    }

    /// Takes the pending deltas, e.g. to store them under fresh keys.
    pub fn drain(&mut self) -> impl Iterator<Item = (Vec<u8>, Sketch)> + '_ {
        self.index.clear();
        self.combos.clear();
        self.slots.drain(..).map(|(k, u)| (k, u.finish()))
    }
}

fn slot_of(
    slots: &mut Vec<(Vec<u8>, Union)>,
    index: &mut HashMap<Vec<u8>, usize>,
    p: Precision,
    key: &[u8],
) -> usize {
    if let Some(&i) = index.get(key) {
        return i;
    }
    slots.push((key.to_vec(), Union::new(p)));
    index.insert(key.to_vec(), slots.len() - 1);
    slots.len() - 1
}

fn insert(s: &mut Union, h: super::ClientHash) {
    let res = s.insert_hash(h);
    debug_assert!(
        res.is_ok(),
        "buffer sketches and hashes share HashVersion::CURRENT"
    );
}

/// The stored sketch (if any) unioned with `delta`, encoded. Corrupt stored
/// bytes or a precision/hash mismatch are errors: the caller decides whether
/// to stop or to overwrite with the delta alone.
pub fn merge_into(existing: Option<&[u8]>, delta: &mut Sketch) -> Result<Vec<u8>, SketchError> {
    match existing {
        None => Ok(delta.to_bytes()),
        Some(bytes) => {
            let mut s = Sketch::from_bytes(bytes)?;
            s.merge(delta)?;
            Ok(s.to_bytes())
        }
    }
}
