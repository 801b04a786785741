//! What an uploaded image may be, checked before any pixel is decoded: its encoded size, and the
//! width and height its header declares (decompression bombs: a few hundred bytes of PNG can
//! declare 100000 x 100000 pixels), its smallest side and its aspect ratio.

use super::PreprocessError;

/// Bounds on one image; `Default` checks nothing (the hard decoder memory cap still applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest encoded image, in bytes.
    pub max_bytes: usize,
    pub max_width: u32,
    pub max_height: u32,
    /// Largest `width * height`.
    pub max_pixels: u64,
    /// Smallest width or height.
    pub min_side: u32,
    /// Largest `long side / short side`.
    pub max_aspect_ratio: u32,
}

impl Default for ImageLimits {
    fn default() -> Self {
        ImageLimits {
            max_bytes: usize::MAX,
            max_width: u32::MAX,
            max_height: u32::MAX,
            max_pixels: u64::MAX,
            min_side: 1,
            max_aspect_ratio: u32::MAX,
        }
    }
}

impl ImageLimits {
    /// Refuses more than `max_bytes` of encoded image.
    pub fn check_bytes(&self, len: usize) -> Result<(), PreprocessError> {
        if len > self.max_bytes {
            return Err(PreprocessError::ImageTooLarge(format!(
                "the image is {len} bytes; at most {} are accepted",
                self.max_bytes
            )));
        }
        Ok(())
    }

    /// Checks the size an image header declares.
    pub fn check_dimensions(&self, width: u32, height: u32) -> Result<(), PreprocessError> {
        if width == 0 || height == 0 {
            return Err(PreprocessError::InvalidImage(
                "image has zero width or height".into(),
            ));
        }
        let pixels = u64::from(width) * u64::from(height);
        if width > self.max_width || height > self.max_height || pixels > self.max_pixels {
            return Err(PreprocessError::ImageTooLarge(format!(
                "the image is {width}x{height} pixels; at most {}x{} and {} pixels in all are \
                 accepted",
                self.max_width, self.max_height, self.max_pixels
            )));
        }
        let (short, long) = (width.min(height), width.max(height));
        if u64::from(long) > u64::from(short) * u64::from(self.max_aspect_ratio) {
            return Err(PreprocessError::AspectRatio(format!(
                "the image is {width}x{height} pixels; its long side may be at most {} times its \
                 short side",
                self.max_aspect_ratio
            )));
        }
        if width.min(height) < self.min_side {
            return Err(PreprocessError::ImageTooSmall(format!(
                "the image is {width}x{height} pixels; each side must be at least {}",
                self.min_side
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> ImageLimits {
        ImageLimits {
            max_bytes: 100,
            max_width: 1000,
            max_height: 500,
            max_pixels: 200_000,
            min_side: 2,
            max_aspect_ratio: 10,
        }
    }

    #[test]
    fn each_bound_has_its_own_error() {
        let l = limits();
        assert!(l.check_dimensions(400, 400).is_ok());
        assert!(l.check_dimensions(20, 200).is_ok(), "ratio 10 is allowed");
        for (w, h) in [(1001, 10), (10, 501), (500, 500)] {
            let e = l.check_dimensions(w, h).unwrap_err();
            assert!(
                matches!(e, PreprocessError::ImageTooLarge(_)),
                "{w}x{h}: {e}"
            );
        }
        let e = l.check_dimensions(1, 5).unwrap_err();
        assert!(matches!(e, PreprocessError::ImageTooSmall(_)), "{e}");
        let e = l.check_dimensions(20, 201).unwrap_err();
        assert!(matches!(e, PreprocessError::AspectRatio(_)), "{e}");
        let e = l.check_dimensions(0, 5).unwrap_err();
        assert!(matches!(e, PreprocessError::InvalidImage(_)), "{e}");
        assert!(l.check_bytes(100).is_ok());
        assert!(matches!(
            l.check_bytes(101),
            Err(PreprocessError::ImageTooLarge(_))
        ));
    }

    #[test]
    fn the_default_checks_nothing_but_emptiness() {
        let l = ImageLimits::default();
        assert!(l.check_dimensions(u32::MAX, 1).is_ok());
        assert!(l.check_bytes(usize::MAX).is_ok());
    }
}
