//! PNG plots: files are complete PNGs of the documented sizes, text is drawn
//! with the embedded font, image grids put every input pixel where the
//! layout says, and bad inputs are errors (not panics).

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use ensueno::io::plot::{
    image_grid, image_grid_rgb, line_chart, scatter_by_class, Series, GRID_PAD_VALUE,
    LINE_CHART_SIZE, SCATTER_SIZE,
};

fn open_png(path: &Path) -> image::RgbImage {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "not a PNG");
    image::load_from_memory_with_format(&bytes, image::ImageFormat::Png)
        .unwrap()
        .to_rgb8()
}

/// Non-white pixels in rows `rows` of the image.
fn ink(img: &image::RgbImage, rows: std::ops::Range<u32>) -> usize {
    img.enumerate_pixels()
        .filter(|(_, y, p)| rows.contains(y) && p.0 != [255, 255, 255])
        .count()
}

#[test]
fn line_chart_writes_png_with_text() {
    let dir = tempfile::tempdir().unwrap();
    let steps: Vec<(f64, f64)> = (1..200)
        .map(|i| (i as f64, 2.0 / i as f64 + 0.01))
        .collect();
    let epochs = [(50.0, 0.05), (100.0, 0.03), (150.0, 0.02)];
    let series = [
        Series {
            name: "loss per step",
            points: &steps,
        },
        Series {
            name: "loss per epoch",
            points: &epochs,
        },
    ];
    for log_y in [false, true] {
        let path = dir.path().join(format!("loss_{log_y}.png"));
        line_chart(&path, "Training loss", "step", "loss", &series, log_y).unwrap();
        let img = open_png(&path);
        assert_eq!(img.dimensions(), LINE_CHART_SIZE);
        // The caption is drawn above the plot area: with the embedded font
        // its rows hold dark pixels; without a title they stay white.
        assert!(ink(&img, 0..40) > 50, "no title text drawn");
    }
    let path = dir.path().join("untitled.png");
    line_chart(&path, "", "step", "loss", &series, false).unwrap();
    assert_eq!(ink(&open_png(&path), 0..40), 0);
    // Only the final file is left: the write went through a temporary file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
}

#[test]
fn line_chart_rejects_empty_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.png");
    assert!(line_chart(&path, "t", "x", "y", &[], false).is_err());
    let empty = Series {
        name: "a",
        points: &[],
    };
    assert!(line_chart(&path, "t", "x", "y", &[empty], false).is_err());
    // Log scale with nothing positive, or nothing finite.
    let neg = [(0.0, -1.0), (1.0, 0.0)];
    let s = Series {
        name: "a",
        points: &neg,
    };
    assert!(line_chart(&path, "t", "x", "y", &[s], true).is_err());
    let nan = [(0.0, f64::NAN)];
    let s = Series {
        name: "a",
        points: &nan,
    };
    assert!(line_chart(&path, "t", "x", "y", &[s], false).is_err());
    assert!(!path.exists());
    // A single point, and a folder that does not exist.
    let one = [(3.0, 3.0)];
    let s = Series {
        name: "a",
        points: &one,
    };
    line_chart(&path, "t", "x", "y", &[s], false).unwrap();
    let missing = dir.path().join("no/such/dir/x.png");
    assert!(line_chart(&missing, "t", "x", "y", &[s], false).is_err());
}

#[test]
fn scatter_by_class_writes_png() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("latents.png");
    let n = 500;
    let points: Vec<(f32, f32)> = (0..n)
        .map(|i| {
            let a = i as f32 * 0.37;
            ((i % 10) as f32 + a.cos(), (i % 10) as f32 * 0.5 + a.sin())
        })
        .collect();
    let classes: Vec<u32> = (0..n).map(|i| (i % 10) as u32).collect();
    let names: Vec<String> = (0..10).map(|d| d.to_string()).collect();
    scatter_by_class(&path, "Latent means by digit", &points, &classes, &names).unwrap();
    let img = open_png(&path);
    assert_eq!(img.dimensions(), SCATTER_SIZE);
    assert!(ink(&img, 0..40) > 50, "no title text drawn");
    // tab10's first colour (class 0) appears, blended at 70% over white.
    let blue = img
        .pixels()
        .filter(|p| {
            let [r, g, b] = p.0.map(i32::from);
            b > r + 80 && b > g + 40
        })
        .count();
    assert!(blue > 20, "class 0 points missing ({blue})");
}

#[test]
fn scatter_by_class_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.png");
    let names = vec!["a".to_string(), "b".to_string()];
    let pts = [(0.0f32, 0.0f32), (1.0, 1.0)];
    // Lengths differ.
    assert!(scatter_by_class(&path, "t", &pts, &[0], &names).is_err());
    // A class without a name.
    assert!(scatter_by_class(&path, "t", &pts, &[0, 2], &names).is_err());
    // Nothing to draw.
    assert!(scatter_by_class(&path, "t", &[], &[], &names).is_err());
    assert!(scatter_by_class(&path, "t", &[(f32::NAN, 0.0)], &[0], &names).is_err());
    assert!(!path.exists());
}

#[test]
fn image_grid_places_pixels() {
    let dev = Device::Cpu;
    // 5 grey 3x4 images, values i/255 * (1 + pixel index) so each pixel is
    // distinct; 2 per row, pad 1, scale 2.
    let (b, h, w) = (5usize, 3usize, 4usize);
    let data: Vec<f32> = (0..b * h * w)
        .map(|k| ((k % 200) as f32 + 10.0) / 255.0)
        .collect();
    let images = Tensor::from_vec(data.clone(), (b, 1, h, w), &dev).unwrap();
    let grid = image_grid_rgb(&images, 2, 1, 2).unwrap();
    let (cols, rows) = (2, 3);
    assert_eq!(
        grid.dimensions(),
        (
            (cols * w * 2 + (cols - 1)) as u32,
            (rows * h * 2 + (rows - 1)) as u32
        )
    );
    // Image 3 (row 1, column 1), pixel (y 2, x 1): both copies of the upscale.
    let (i, y, x) = (3usize, 2usize, 1usize);
    let expected = (data[i * h * w + y * w + x] * 255.0).round() as u8;
    let (x0, y0) = (w * 2 + 1, h * 2 + 1);
    for (dy, dx) in [(0, 0), (1, 1)] {
        let p = grid.get_pixel((x0 + 2 * x + dx) as u32, (y0 + 2 * y + dy) as u32);
        assert_eq!(p.0, [expected; 3]);
    }
    // Padding and the empty last cell are grey.
    assert_eq!(grid.get_pixel((w * 2) as u32, 0).0, [GRID_PAD_VALUE; 3]);
    assert_eq!(
        grid.get_pixel(grid.width() - 1, grid.height() - 1).0,
        [GRID_PAD_VALUE; 3]
    );

    // RGB, clamped, f64 input, written to a file.
    let rgb = Tensor::new(&[[[[0.2f64]], [[1.5]], [[-0.3]]]], &dev).unwrap();
    assert_eq!(rgb.dims(), [1, 3, 1, 1]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("grid.png");
    image_grid(&path, &rgb, 8, 2, 3).unwrap();
    let img = open_png(&path);
    assert_eq!(img.dimensions(), (3, 3));
    assert_eq!(img.get_pixel(2, 2).0, [51, 255, 0]);
}

#[test]
fn image_grid_rejects_bad_input() {
    let dev = Device::Cpu;
    let ok = Tensor::zeros((2, 1, 4, 4), DType::F32, &dev).unwrap();
    assert!(image_grid_rgb(&ok, 0, 0, 1).is_err());
    assert!(image_grid_rgb(&ok, 2, 0, 0).is_err());
    for shape in [
        vec![1, 4, 4],
        vec![2, 2, 4, 4],
        vec![0, 1, 4, 4],
        vec![1, 1, 1, 4, 4],
    ] {
        let t = Tensor::zeros(shape.as_slice(), DType::F32, &dev).unwrap();
        assert!(image_grid_rgb(&t, 2, 0, 1).is_err(), "{shape:?}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("g.png");
    assert!(image_grid(&path, &ok, 0, 0, 1).is_err());
    assert!(!path.exists());
}
