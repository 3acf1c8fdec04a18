//! PNG plots for training and evaluation reports: line charts (losses),
//! class-coloured scatter plots (2-D latents) and image grids (samples).
//!
//! Charts are drawn with plotters into an in-memory RGB buffer, encoded as
//! PNG and written atomically. Text uses DejaVu Sans, embedded in the crate
//! (`assets/fonts/DejaVuSans.ttf`, Bitstream Vera licence with DejaVu's
//! public-domain changes, see `assets/fonts/DejaVuSans-LICENSE.txt`), so no
//! system font is needed.

use std::io::Write;
use std::ops::Range;
use std::path::Path;
use std::sync::Once;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use plotters::coord::ranged1d::{AsRangedCoord, ValueFormatter};
use plotters::prelude::*;

use crate::io::atomic::write_atomic;
use crate::{Error, Result};

/// Size in pixels `(width, height)` of [`line_chart`] images.
pub const LINE_CHART_SIZE: (u32, u32) = (960, 600);
/// Size in pixels `(width, height)` of [`scatter_by_class`] images.
pub const SCATTER_SIZE: (u32, u32) = (800, 800);
/// Grey level (0..=255) of the padding between the tiles of [`image_grid`]:
/// mid grey separates both white-on-black digits and light photographs.
pub const GRID_PAD_VALUE: u8 = 128;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
static REGISTER_FONT: Once = Once::new();
const FONT_FAMILY: &str = "sans-serif";

/// Registers the embedded font with plotters' text renderer, once per
/// process. plotters resolves `"sans-serif"` through this registry.
fn register_font() {
    REGISTER_FONT.call_once(|| {
        // The bytes are fixed at compile time and known to parse (the tests
        // draw text); a failure would only leave labels undrawn.
        if plotters::style::register_font(FONT_FAMILY, FontStyle::Normal, FONT).is_err() {
            tracing::warn!("plot: the embedded font could not be registered; text will be missing");
        }
    });
}

/// One named line of a [`line_chart`].
#[derive(Debug, Clone, Copy)]
pub struct Series<'a> {
    pub name: &'a str,
    pub points: &'a [(f64, f64)],
}

/// Ten distinct colours (matplotlib's "tab10"), then plotters' palette.
fn colour(i: usize) -> RGBColor {
    const TAB10: [(u8, u8, u8); 10] = [
        (31, 119, 180),
        (255, 127, 14),
        (44, 160, 44),
        (214, 39, 40),
        (148, 103, 189),
        (140, 86, 75),
        (227, 119, 194),
        (127, 127, 127),
        (188, 189, 34),
        (23, 190, 207),
    ];
    match TAB10.get(i) {
        Some(&(r, g, b)) => RGBColor(r, g, b),
        None => {
            let (r, g, b) = Palette99::pick(i).rgb();
            RGBColor(r, g, b)
        }
    }
}

fn plot_error(path: &Path, e: impl std::fmt::Display) -> Error {
    Error::Image {
        path: path.to_path_buf(),
        message: format!("drawing the plot failed: {e}"),
    }
}

/// A range covering `lo..hi` with a margin, never empty.
fn padded(lo: f64, hi: f64, log: bool) -> Range<f64> {
    if log {
        let (l, h) = (lo.log10(), hi.log10());
        let m = if h > l { (h - l) * 0.05 } else { 0.5 };
        10f64.powf(l - m)..10f64.powf(h + m)
    } else {
        let m = if hi > lo {
            (hi - lo) * 0.05
        } else {
            lo.abs().max(1.0) * 0.5
        };
        lo - m..hi + m
    }
}

fn bounds(points: impl Iterator<Item = (f64, f64)>) -> Option<(Range<f64>, Range<f64>)> {
    points.fold(None, |acc, (x, y)| match acc {
        None => Some((x..x, y..y)),
        Some((xr, yr)) => Some((
            xr.start.min(x)..xr.end.max(x),
            yr.start.min(y)..yr.end.max(y),
        )),
    })
}

/// Draws into an RGB buffer of `size` and writes it to `path` as PNG.
fn render(
    path: &Path,
    size: (u32, u32),
    draw: impl FnOnce(&DrawingArea<BitMapBackend, plotters::coord::Shift>) -> Result<()>,
) -> Result<()> {
    register_font();
    let mut buffer = vec![0u8; size.0 as usize * size.1 as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, size).into_drawing_area();
        root.fill(&WHITE).map_err(|e| plot_error(path, e))?;
        draw(&root)?;
        root.present().map_err(|e| plot_error(path, e))?;
    }
    let image = RgbImage::from_raw(size.0, size.1, buffer)
        .ok_or_else(|| plot_error(path, "buffer size mismatch"))?;
    write_png(path, &image)
}

/// Writes an RGB image as PNG, atomically.
fn write_png(path: &Path, image: &RgbImage) -> Result<()> {
    write_atomic(path, |w: &mut dyn Write| {
        image
            .write_with_encoder(image::codecs::png::PngEncoder::new(w))
            .map_err(|e| Error::Image {
                path: path.to_path_buf(),
                message: e.to_string(),
            })
    })
}

/// Line chart of one or more series (e.g. loss per step and per epoch), x and
/// y labelled, with a legend, written atomically as a PNG of
/// [`LINE_CHART_SIZE`]. With `log_y` the y axis is logarithmic and points with
/// `y <= 0` are left out; non-finite points are always left out. An error if
/// there are no series or no point left to draw.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    log_y: bool,
) -> Result<()> {
    let keep = |&(x, y): &(f64, f64)| x.is_finite() && y.is_finite() && (!log_y || y > 0.0);
    let Some((xr, yr)) = bounds(
        series
            .iter()
            .flat_map(|s| s.points.iter().copied().filter(keep)),
    ) else {
        return Err(Error::invalid(format!(
            "line chart {}: nothing to draw ({} series, no finite{} point)",
            path.display(),
            series.len(),
            if log_y { " positive" } else { "" }
        )));
    };
    let x_range = padded(xr.start, xr.end, false);
    let y_range = padded(yr.start, yr.end, log_y);
    render(path, LINE_CHART_SIZE, |root| {
        let labels = Labels {
            path,
            title,
            x_label,
            y_label,
        };
        if log_y {
            draw_lines(root, &labels, series, &keep, x_range, y_range.log_scale())
        } else {
            draw_lines(root, &labels, series, &keep, x_range, y_range)
        }
    })
}

struct Labels<'a> {
    path: &'a Path,
    title: &'a str,
    x_label: &'a str,
    y_label: &'a str,
}

fn draw_lines<Y>(
    root: &DrawingArea<BitMapBackend, plotters::coord::Shift>,
    labels: &Labels,
    series: &[Series],
    keep: &dyn Fn(&(f64, f64)) -> bool,
    x_range: Range<f64>,
    y_range: Y,
) -> Result<()>
where
    Y: AsRangedCoord<Value = f64>,
    Y::CoordDescType: ValueFormatter<f64>,
{
    let err = |e: &dyn std::fmt::Display| plot_error(labels.path, e);
    let mut chart = ChartBuilder::on(root)
        .caption(labels.title, (FONT_FAMILY, 26))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(72)
        .build_cartesian_2d(x_range, y_range)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc(labels.x_label)
        .y_desc(labels.y_label)
        .label_style((FONT_FAMILY, 15))
        .axis_desc_style((FONT_FAMILY, 17))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = colour(i);
        let points: Vec<(f64, f64)> = s.points.iter().copied().filter(keep).collect();
        // A lone point would be an invisible zero-length line: mark it.
        if points.len() == 1 {
            chart
                .draw_series(std::iter::once(Circle::new(points[0], 3, c.filled())))
                .map_err(|e| err(&e))?;
        }
        chart
            .draw_series(LineSeries::new(points, c.stroke_width(2)))
            .map_err(|e| err(&e))?
            .label(s.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    chart
        .configure_series_labels()
        .label_font((FONT_FAMILY, 15))
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperRight)
        .draw()
        .map_err(|e| err(&e))?;
    Ok(())
}

/// Scatter plot of 2-D points coloured by class, with a legend of
/// `class_names` (the Keras VAE example's "latent means of the test set
/// coloured by digit"), written atomically as a PNG of [`SCATTER_SIZE`].
/// `classes[i]` is the class of `points[i]` and indexes `class_names`.
/// Non-finite points are left out.
pub fn scatter_by_class(
    path: &Path,
    title: &str,
    points: &[(f32, f32)],
    classes: &[u32],
    class_names: &[String],
) -> Result<()> {
    if points.len() != classes.len() {
        return Err(Error::invalid(format!(
            "scatter plot {}: {} points but {} classes",
            path.display(),
            points.len(),
            classes.len()
        )));
    }
    if let Some(&c) = classes.iter().find(|&&c| c as usize >= class_names.len()) {
        return Err(Error::invalid(format!(
            "scatter plot {}: class {c} has no name ({} class names)",
            path.display(),
            class_names.len()
        )));
    }
    let finite = |p: &(f32, f32)| p.0.is_finite() && p.1.is_finite();
    let Some((xr, yr)) = bounds(
        points
            .iter()
            .filter(|p| finite(p))
            .map(|&(x, y)| (x as f64, y as f64)),
    ) else {
        return Err(Error::invalid(format!(
            "scatter plot {}: no finite point to draw",
            path.display()
        )));
    };
    render(path, SCATTER_SIZE, |root| {
        let err = |e: &dyn std::fmt::Display| plot_error(path, e);
        let mut chart = ChartBuilder::on(root)
            .caption(title, (FONT_FAMILY, 26))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(
                padded(xr.start, xr.end, false),
                padded(yr.start, yr.end, false),
            )
            .map_err(|e| err(&e))?;
        chart
            .configure_mesh()
            .label_style((FONT_FAMILY, 15))
            .draw()
            .map_err(|e| err(&e))?;
        for (class, name) in class_names.iter().enumerate() {
            let c = colour(class);
            let members = points
                .iter()
                .zip(classes)
                .filter(|(p, &k)| k as usize == class && finite(p))
                .map(|(&(x, y), _)| Circle::new((x as f64, y as f64), 2, c.mix(0.7).filled()));
            chart
                .draw_series(members)
                .map_err(|e| err(&e))?
                .label(name.as_str())
                .legend(move |(x, y)| Circle::new((x + 8, y), 4, c.filled()));
        }
        chart
            .configure_series_labels()
            .label_font((FONT_FAMILY, 15))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::UpperRight)
            .draw()
            .map_err(|e| err(&e))?;
        Ok(())
    })
}

/// A grid of images as one RGB image: `columns` images per row (fewer when
/// there are fewer images), `pad` pixels of grey ([`GRID_PAD_VALUE`]) between
/// tiles, each pixel repeated `scale` x `scale` times. Values are clamped to
/// `[0, 1]` and rounded to 8 bits; grey images are replicated to RGB.
///
/// # Shapes
/// `images (B, C, H, W)` with `B >= 1` and `C` 1 or 3, any float dtype and
/// device. The result is `cols * W * scale + (cols - 1) * pad` wide and
/// `rows * H * scale + (rows - 1) * pad` high, with `cols = min(columns, B)`
/// and `rows = ceil(B / columns)`.
pub fn image_grid_rgb(
    images: &Tensor,
    columns: usize,
    pad: usize,
    scale: usize,
) -> Result<RgbImage> {
    let (b, c, h, w) = match images.dims() {
        &[b, c, h, w] if b >= 1 && (c == 1 || c == 3) && h >= 1 && w >= 1 => (b, c, h, w),
        _ => {
            return Err(Error::Shape {
                what: "image grid input".into(),
                expected: "(B >= 1, C = 1 or 3, H >= 1, W >= 1)".into(),
                got: format!("{:?}", images.dims()),
            })
        }
    };
    if columns == 0 || scale == 0 {
        return Err(Error::invalid(format!(
            "image grid: columns ({columns}) and scale ({scale}) must be at least 1"
        )));
    }
    let cols = columns.min(b);
    let rows = b.div_ceil(columns);
    let (tile_w, tile_h) = (w * scale, h * scale);
    let width = cols * tile_w + (cols - 1) * pad;
    let height = rows * tile_h + (rows - 1) * pad;
    let (width, height) = match (u32::try_from(width), u32::try_from(height)) {
        (Ok(wd), Ok(ht)) if (width as u64) * (height as u64) * 3 < (1u64 << 34) => (wd, ht),
        _ => {
            return Err(Error::invalid(format!(
                "image grid of {width}x{height} pixels is too large"
            )))
        }
    };
    let pixels = images
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .clamp(0f32, 1f32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mut grid = RgbImage::from_pixel(width, height, image::Rgb([GRID_PAD_VALUE; 3]));
    let to_u8 = |v: f32| (v * 255.0).round() as u8;
    for (i, img) in pixels.chunks_exact(c * h * w).enumerate() {
        let (x0, y0) = (
            (i % columns) * (tile_w + pad),
            (i / columns) * (tile_h + pad),
        );
        for y in 0..tile_h {
            for x in 0..tile_w {
                let at = (y / scale) * w + x / scale;
                let rgb = if c == 1 {
                    [to_u8(img[at]); 3]
                } else {
                    [
                        to_u8(img[at]),
                        to_u8(img[h * w + at]),
                        to_u8(img[2 * h * w + at]),
                    ]
                };
                grid.put_pixel((x0 + x) as u32, (y0 + y) as u32, image::Rgb(rgb));
            }
        }
    }
    Ok(grid)
}

/// [`image_grid_rgb`] written atomically to `path` as PNG.
///
/// # Shapes
/// `images (B, C, H, W)` in `[0, 1]`, `C` 1 or 3.
pub fn image_grid(
    path: &Path,
    images: &Tensor,
    columns: usize,
    pad: usize,
    scale: usize,
) -> Result<()> {
    let grid = image_grid_rgb(images, columns, pad, scale)?;
    write_png(path, &grid)
}
