//! The vision-encoder output cache of one chat model: each image's rows,
//! (tokens_i, hidden), by its [`ImageKey`], least recently used evicted first,
//! bounded in bytes (`[engine] image_cache_bytes`; 0 turns it off). A
//! multi-turn chat resends its images with every turn; with this only the new
//! ones reach the encoder. Owned by the engine thread, like the model.

use candle_core::Tensor;
use lru::LruCache;
use prometheus::{IntCounter, IntGauge};

use crate::model::{ImageInput, ImageKey, KeyedImage};

/// Where the cache reports what it did.
#[derive(Clone)]
pub struct ImageCacheMetrics {
    /// Images whose rows did not need an encode of their own.
    pub hits: IntCounter,
    /// Images encoded.
    pub misses: IntCounter,
    /// Bytes of rows held.
    pub bytes: IntGauge,
}

/// Encoder rows by image key, within a byte budget.
pub struct ImageCache {
    entries: LruCache<ImageKey, Tensor>,
    /// Most bytes of rows held; 0: nothing is kept.
    budget: usize,
    /// Bytes of rows held now (each entry owns its storage, see `insert`).
    bytes: usize,
    metrics: ImageCacheMetrics,
}

/// Bytes of a tensor's values.
fn size(t: &Tensor) -> usize {
    t.elem_count() * t.dtype().size_in_bytes()
}

impl ImageCache {
    pub fn new(budget: usize, metrics: ImageCacheMetrics) -> Self {
        ImageCache {
            entries: LruCache::unbounded(),
            budget,
            bytes: 0,
            metrics,
        }
    }

    /// Bytes of rows held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether `key`'s rows are held (without touching the order of use).
    pub fn holds(&self, key: &ImageKey) -> bool {
        self.entries.contains(key)
    }

    /// The rows of `key`, now the most recently used.
    fn get(&mut self, key: &ImageKey) -> Option<Tensor> {
        self.entries.get(key).cloned()
    }

    /// Keeps `rows` under `key`, evicting the least recently used entries
    /// until they fit; rows bigger than the whole budget are not kept.
    fn insert(&mut self, key: ImageKey, rows: &Tensor) -> candle_core::Result<()> {
        let n = size(rows);
        if n > self.budget || self.entries.contains(&key) {
            return Ok(());
        }
        while self.bytes + n > self.budget {
            match self.entries.pop_lru() {
                Some((_, old)) => self.bytes -= size(&old),
                None => break,
            }
        }
        // A copy of its own: `rows` may be a view into a whole batch's output,
        // which would stay alive (uncounted) as long as the entry does.
        self.entries.put(key, rows.force_contiguous()?);
        self.bytes += n;
        self.metrics
            .bytes
            .set(i64::try_from(self.bytes).unwrap_or(i64::MAX));
        Ok(())
    }

    /// One (tokens_i, hidden) rows tensor per image of `images`, in order:
    /// those held come from the cache, the others from one call of `encode`
    /// on each distinct missing image (an image twice in one step is encoded
    /// once). The encoded rows are kept; hits and misses are counted when all
    /// went well.
    pub fn rows<E>(
        &mut self,
        images: &[&KeyedImage],
        encode: impl FnOnce(&[&ImageInput]) -> Result<Vec<Tensor>, E>,
    ) -> Result<Vec<Tensor>, E>
    where
        E: From<candle_core::Error>,
    {
        let on = self.budget > 0;
        let mut found: Vec<Option<Tensor>> = Vec::with_capacity(images.len());
        // Index into `fresh` of each image not found.
        let mut slot: Vec<usize> = Vec::with_capacity(images.len());
        let mut fresh: Vec<&KeyedImage> = Vec::new();
        for img in images {
            let held = if on { self.get(&img.key) } else { None };
            let again = fresh.iter().position(|f| on && f.key == img.key);
            slot.push(again.unwrap_or(fresh.len()));
            if held.is_none() && again.is_none() {
                fresh.push(img);
            }
            found.push(held);
        }
        let encoded = if fresh.is_empty() {
            Vec::new()
        } else {
            let inputs: Vec<&ImageInput> = fresh.iter().map(|f| &f.input).collect();
            encode(&inputs)?
        };
        if encoded.len() != fresh.len() {
            return Err(candle_core::Error::Msg(format!(
                "{} images encoded into {} row blocks",
                fresh.len(),
                encoded.len()
            ))
            .into());
        }
        for (img, rows) in fresh.iter().zip(&encoded) {
            self.insert(img.key, rows)?;
        }
        self.metrics.misses.inc_by(fresh.len() as u64);
        self.metrics
            .hits
            .inc_by((images.len() - fresh.len()) as u64);
        Ok(found
            .into_iter()
            .zip(slot)
            .map(|(held, i)| held.unwrap_or_else(|| encoded[i].clone()))
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn metrics() -> ImageCacheMetrics {
        ImageCacheMetrics {
            hits: IntCounter::new("h", "h").unwrap(),
            misses: IntCounter::new("m", "m").unwrap(),
            bytes: IntGauge::new("b", "b").unwrap(),
        }
    }

    /// A one-value (1, 1, 1) image whose value makes its key.
    fn image(v: f32) -> KeyedImage {
        let t = Tensor::full(v, (1, 1, 1), &Device::Cpu).unwrap();
        KeyedImage::new(ImageInput::Pixels(t)).unwrap()
    }

    /// A stand-in encoder: 4 rows of 2 f32 (32 bytes) per image, all equal to
    /// its pixel value; counts the images it saw.
    fn encode(seen: &mut usize, inputs: &[&ImageInput]) -> candle_core::Result<Vec<Tensor>> {
        *seen += inputs.len();
        inputs
            .iter()
            .map(|i| match i {
                ImageInput::Pixels(t) => t.flatten_all()?.broadcast_as((4, 2))?.contiguous(),
                _ => unreachable!(),
            })
            .collect()
    }

    /// Runs one step's lookup over images of values `vs`; returns how many
    /// were encoded and checks each one got its own rows.
    fn step(cache: &mut ImageCache, vs: &[f32]) -> usize {
        let imgs: Vec<KeyedImage> = vs.iter().map(|&v| image(v)).collect();
        let refs: Vec<&KeyedImage> = imgs.iter().collect();
        let mut seen = 0;
        let rows = cache.rows(&refs, |i| encode(&mut seen, i)).unwrap();
        for (v, r) in vs.iter().zip(rows) {
            assert_eq!(r.dims(), &[4, 2]);
            assert_eq!(r.to_vec2::<f32>().unwrap()[3][1], *v);
        }
        seen
    }

    #[test]
    fn held_images_skip_the_encoder_and_count_as_hits() {
        let mut c = ImageCache::new(1024, metrics());
        assert_eq!(step(&mut c, &[1.0, 2.0]), 2);
        assert_eq!(step(&mut c, &[2.0, 3.0, 1.0]), 1);
        assert_eq!((c.metrics.hits.get(), c.metrics.misses.get()), (2, 3));
        assert_eq!(c.bytes(), 3 * 32);
        assert_eq!(c.metrics.bytes.get(), 3 * 32);
    }

    #[test]
    fn the_same_image_twice_in_a_step_is_encoded_once() {
        let mut c = ImageCache::new(1024, metrics());
        assert_eq!(step(&mut c, &[5.0, 5.0, 6.0, 5.0]), 2);
        assert_eq!((c.metrics.hits.get(), c.metrics.misses.get()), (2, 2));
    }

    #[test]
    fn the_least_recently_used_goes_first_when_the_budget_is_full() {
        // Room for two entries of 32 bytes.
        let mut c = ImageCache::new(64, metrics());
        step(&mut c, &[1.0]);
        step(&mut c, &[2.0]);
        assert_eq!(step(&mut c, &[1.0]), 0, "1 is held and now the most recent");
        assert_eq!(step(&mut c, &[3.0]), 1, "3 evicts 2");
        assert_eq!(c.bytes(), 64);
        assert_eq!(step(&mut c, &[1.0, 3.0]), 0);
        assert_eq!(step(&mut c, &[2.0]), 1, "2 was evicted");
        assert_eq!(c.entries.len(), 2);
    }

    #[test]
    fn a_zero_budget_or_rows_bigger_than_it_keep_nothing() {
        for budget in [0, 31] {
            let mut c = ImageCache::new(budget, metrics());
            assert_eq!(step(&mut c, &[1.0]), 1);
            assert_eq!(step(&mut c, &[1.0]), 1);
            assert_eq!(c.bytes(), 0);
            assert_eq!(c.metrics.hits.get(), 0);
        }
        let mut off = ImageCache::new(0, metrics());
        assert_eq!(step(&mut off, &[7.0, 7.0]), 2, "off: no reuse at all");
    }

    #[test]
    fn a_view_into_a_batch_is_stored_as_its_own_copy() {
        let mut c = ImageCache::new(1024, metrics());
        let batch = Tensor::zeros((8, 4, 2), DType::F32, &Device::Cpu).unwrap();
        let img = image(1.0);
        let rows = c.rows(&[&img], |_| batch.get(3).map(|r| vec![r])).unwrap();
        assert_eq!(rows[0].dims(), &[4, 2]);
        assert_eq!(c.bytes(), 32);
        // The view starts 3 images into the batch's storage; the copy at 0.
        assert_eq!(rows[0].layout().start_offset(), 24);
        assert_eq!(c.entries.peek(&img.key).unwrap().layout().start_offset(), 0);
    }

    #[test]
    fn an_encoder_that_returns_too_few_blocks_is_an_error() {
        let mut c = ImageCache::new(1024, metrics());
        let img = image(1.0);
        let out: candle_core::Result<_> = c.rows(&[&img], |_| Ok(vec![]));
        assert!(out.is_err());
        assert_eq!(c.metrics.misses.get(), 0);
    }
}
