//! Figures as PNG and SVG with plotters, using an embedded DejaVu Sans (assets/fonts) so they
//! render on machines without system fonts (no fontconfig lookup is linked).
use crate::error::{Error, Result};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;

static FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const FAMILY: &str = "sans-serif";

fn ensure_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        for name in ["sans-serif", "serif", "monospace"] {
            // DejaVu Sans is a valid font; registration cannot fail for it.
            let _ = plotters::style::register_font(name, FontStyle::Normal, FONT);
        }
    });
}

/// Line colours (a Tableau-like palette), cycled.
const PALETTE: [(u8, u8, u8); 16] = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (60, 60, 60),
    (23, 190, 207),
    (0, 0, 128),
    (128, 0, 0),
    (0, 128, 128),
    (128, 128, 0),
    (255, 0, 255),
    (0, 0, 0),
];

/// Colour index of baselines (grey).
pub const BASELINE: usize = usize::MAX;

pub fn palette(i: usize) -> RGBColor {
    if i == BASELINE {
        return RGBColor(130, 130, 130);
    }
    let (r, g, b) = PALETTE[i % PALETTE.len()];
    RGBColor(r, g, b)
}

/// Viridis, by linear interpolation between 9 anchors; `t` in [0, 1].
pub fn viridis(t: f64) -> RGBColor {
    const V: [(f64, f64, f64); 9] = [
        (68., 1., 84.),
        (71., 44., 122.),
        (59., 81., 139.),
        (44., 113., 142.),
        (33., 144., 141.),
        (39., 173., 129.),
        (92., 200., 99.),
        (170., 220., 50.),
        (253., 231., 37.),
    ];
    interpolate(&V, if t.is_finite() { t } else { 0.0 })
}

/// Blue–white–red (a coolwarm-like diverging map); `t` in [0, 1], 0.5 white.
pub fn coolwarm(t: f64) -> RGBColor {
    const V: [(f64, f64, f64); 5] = [(59., 76., 192.), (141., 176., 254.), (242., 242., 242.), (244., 154., 123.), (180., 4., 38.)];
    interpolate(&V, if t.is_finite() { t } else { 0.5 })
}

/// The colour at `t` (clamped to [0, 1]) of the map through `anchors`, equally spaced, by
/// linear interpolation per channel.
fn interpolate(anchors: &[(f64, f64, f64)], t: f64) -> RGBColor {
    let x = t.clamp(0.0, 1.0) * (anchors.len() - 1) as f64;
    let i = (x.floor() as usize).min(anchors.len() - 2);
    let f = x - i as f64;
    let mix = |a: f64, b: f64| (a + (b - a) * f).round() as u8;
    let (a, b) = (anchors[i], anchors[i + 1]);
    RGBColor(mix(a.0, b.0), mix(a.1, b.1), mix(a.2, b.2))
}

/// Grouped bars: one group of bars per category, one bar per series (`values[i]` for
/// `categories[i]`; NaN leaves a gap).
#[derive(Debug, Clone)]
pub struct BarPanel {
    pub title: String,
    pub categories: Vec<String>,
    pub series: Vec<(String, Vec<f64>)>,
    pub y_desc: String,
    pub y_range: (f64, f64),
}

/// One line of a line panel.
#[derive(Debug, Clone)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub color: usize,
    pub dashed: bool,
}

/// A line chart.
#[derive(Debug, Clone)]
pub struct LinePanel {
    pub title: String,
    pub x_desc: String,
    pub y_desc: String,
    pub x_range: (f64, f64),
    pub y_range: (f64, f64),
    pub series: Vec<Series>,
    /// A horizontal reference line (e.g. chance at 0.5).
    pub reference: Option<f64>,
    /// x values (range and points) are log2 of the quantity; ticks are labelled 2^x.
    pub log2_x: bool,
}

/// A square heatmap with row and column labels and the value written in every cell.
#[derive(Debug, Clone)]
pub struct HeatPanel {
    pub title: String,
    pub labels: Vec<String>,
    /// `values[row][col]`.
    pub values: Vec<Vec<f64>>,
    pub vmin: f64,
    pub vmax: f64,
    pub x_desc: String,
    pub y_desc: String,
    /// Diverging colours (blue below the middle of the range, red above) instead of viridis.
    pub diverging: bool,
}

fn derr<E: std::fmt::Debug>(e: E) -> Error {
    Error::input(format!("drawing a figure: {e:?}"))
}

fn grid_shape(n: usize) -> (usize, usize) {
    let cols = match n {
        0 | 1 => 1,
        2 | 4 => 2,
        3 | 5 | 6 | 9 => 3,
        _ => 4,
    };
    (n.div_ceil(cols).max(1), cols)
}

fn draw_lines<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &LinePanel) -> Result<()> {
    let (x0, x1) = p.x_range;
    let (y0, y1) = p.y_range;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(derr)?;
    chart
        .configure_mesh()
        .x_desc(p.x_desc.as_str())
        .y_desc(p.y_desc.as_str())
        .x_label_formatter(&|x: &f64| {
            if p.log2_x {
                if (x - x.round()).abs() < 1e-9 { format!("{:.0}", x.exp2()) } else { String::new() }
            } else if (x - x.round()).abs() < 1e-9 {
                format!("{x:.0}")
            } else {
                format!("{x:.1}")
            }
        })
        .y_label_formatter(&|y: &f64| if y.abs() >= 10_000.0 { format!("{:.0}k", y / 1000.0) } else if y.abs() >= 1000.0 { format!("{:.1}k", y / 1000.0) } else if y.abs() >= 100.0 { format!("{y:.0}") } else if y.abs() < 5e-3 { "0.00".to_string() } else { format!("{y:.2}") })
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .light_line_style(RGBColor(240, 240, 240))
        .draw()
        .map_err(derr)?;
    if let Some(r) = p.reference {
        chart
            .draw_series(DashedLineSeries::new(vec![(x0, r), (x1, r)], 4, 4, RGBColor(120, 120, 120).stroke_width(1)))
            .map_err(derr)?;
    }
    for s in &p.series {
        let color = palette(s.color);
        let pts: Vec<(f64, f64)> = s.points.iter().copied().filter(|(x, y)| x.is_finite() && y.is_finite()).collect();
        if s.dashed {
            chart.draw_series(DashedLineSeries::new(pts, 6, 4, color.stroke_width(2))).map_err(derr)?;
        } else {
            chart.draw_series(LineSeries::new(pts.clone(), color.stroke_width(2))).map_err(derr)?;
            if pts.len() <= 12 {
                chart.draw_series(pts.iter().map(|&(x, y)| Circle::new((x, y), 3, color.filled()))).map_err(derr)?;
            }
        }
    }
    Ok(())
}

fn draw_heat<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &HeatPanel) -> Result<()> {
    let k = p.labels.len();
    if k == 0 {
        return Ok(());
    }
    let labels = p.labels.clone();
    let labels_y = p.labels.clone();
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 16))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(44)
        .build_cartesian_2d((0..k as i32 - 1).into_segmented(), (0..k as i32 - 1).into_segmented())
        .map_err(derr)?;
    let fmt_x = move |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => labels.get(*i as usize).cloned().unwrap_or_default(),
        SegmentValue::Last => String::new(),
    };
    // Row 0 is drawn at the top.
    let fmt_y = move |v: &SegmentValue<i32>| match v {
        SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => {
            labels_y.get(k.wrapping_sub(1).wrapping_sub(*i as usize)).cloned().unwrap_or_default()
        }
        SegmentValue::Last => String::new(),
    };
    chart
        .configure_mesh()
        .disable_mesh()
        .x_labels(k)
        .y_labels(k)
        .x_label_formatter(&fmt_x)
        .y_label_formatter(&fmt_y)
        .x_desc(p.x_desc.as_str())
        .y_desc(p.y_desc.as_str())
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .draw()
        .map_err(derr)?;
    let span = (p.vmax - p.vmin).max(1e-12);
    for (r, row) in p.values.iter().enumerate() {
        let y = (k - 1 - r) as i32;
        for (c, &v) in row.iter().enumerate() {
            let x = c as i32;
            let color = match (v.is_finite(), p.diverging) {
                (false, _) => RGBColor(230, 230, 230),
                (true, false) => viridis((v - p.vmin) / span),
                (true, true) => coolwarm((v - p.vmin) / span),
            };
            chart
                .draw_series(std::iter::once(Rectangle::new(
                    [(SegmentValue::Exact(x), SegmentValue::Exact(y)), (SegmentValue::Exact(x + 1), SegmentValue::Exact(y + 1))],
                    color.filled(),
                )))
                .map_err(derr)?;
            if k <= 16 {
                let t = (v - p.vmin) / span;
                let text_color = if p.diverging || t > 0.6 { BLACK } else { WHITE };
                let size = if k <= 8 { 12 } else { 9 };
                let style = TextStyle::from((FAMILY, size).into_font()).color(&text_color).pos(Pos::new(HPos::Center, VPos::Center));
                let label = if v.is_finite() { format!("{v:.2}") } else { "–".into() };
                chart
                    .draw_series(std::iter::once(Text::new(label, (SegmentValue::CenterOf(x), SegmentValue::CenterOf(y)), style)))
                    .map_err(derr)?;
            }
        }
    }
    Ok(())
}

enum Panels<'a> {
    Lines(&'a [LinePanel], &'a [Series]),
    Heat(&'a [HeatPanel], (f64, f64)),
    Bars(&'a BarPanel),
}

fn draw_bars<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, p: &BarPanel) -> Result<()> {
    let k = p.categories.len().max(1);
    let m = p.series.len().max(1);
    let (y0, y1) = p.y_range;
    let mut chart = ChartBuilder::on(area)
        .caption(&p.title, (FAMILY, 18))
        .margin(8)
        .x_label_area_size(36)
        .y_label_area_size(52)
        .build_cartesian_2d(0.0..k as f64, y0..y1)
        .map_err(derr)?;
    let cats = p.categories.clone();
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(k * 2 + 1)
        .x_label_formatter(&move |x: &f64| {
            let i = (x - 0.5).round();
            if (x - 0.5 - i).abs() < 1e-6 && i >= 0.0 { cats.get(i as usize).cloned().unwrap_or_default() } else { String::new() }
        })
        .y_desc(p.y_desc.as_str())
        .y_label_formatter(&|y: &f64| format!("{:.0}%", y * 100.0))
        .label_style((FAMILY, 12))
        .axis_desc_style((FAMILY, 13))
        .light_line_style(RGBColor(235, 235, 235))
        .draw()
        .map_err(derr)?;
    let width = 0.8 / m as f64;
    for (j, (_, values)) in p.series.iter().enumerate() {
        let color = palette(j);
        for (i, &v) in values.iter().enumerate().take(k) {
            if !v.is_finite() {
                continue;
            }
            let x = i as f64 + 0.1 + j as f64 * width;
            chart
                .draw_series(std::iter::once(Rectangle::new([(x, y0), (x + width * 0.92, v.clamp(y0, y1))], color.filled())))
                .map_err(derr)?;
        }
    }
    Ok(())
}

/// One row of legend entries (line samples and labels), centred.
fn draw_legend<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, entries: &[Series]) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let style = TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    let widths: Vec<i32> = entries.iter().map(|e| 34 + 8 * e.label.chars().count() as i32 + 18).collect();
    let total: i32 = widths.iter().sum();
    let mut x = ((w as i32 - total) / 2).max(4);
    let y = h as i32 / 2;
    for (e, width) in entries.iter().zip(widths) {
        let color = palette(e.color);
        if e.dashed {
            for k in 0..3 {
                area.draw(&PathElement::new(vec![(x + 10 * k, y), (x + 10 * k + 6, y)], color.stroke_width(3))).map_err(derr)?;
            }
        } else {
            area.draw(&PathElement::new(vec![(x, y), (x + 26, y)], color.stroke_width(3))).map_err(derr)?;
        }
        area.draw(&Text::new(e.label.clone(), (x + 32, y), style.clone())).map_err(derr)?;
        x += width;
    }
    Ok(())
}

/// A horizontal colour bar from vmin to vmax with its end labels.
fn draw_colorbar<DB: DrawingBackend>(area: &DrawingArea<DB, Shift>, (vmin, vmax): (f64, f64), diverging: bool) -> Result<()> {
    let (w, h) = area.dim_in_pixel();
    let bar_w = 300i32.min(w as i32 - 120);
    let x0 = (w as i32 - bar_w) / 2;
    let (y0, y1) = (h as i32 / 2 - 7, h as i32 / 2 + 7);
    for i in 0..bar_w {
        let t = i as f64 / (bar_w - 1).max(1) as f64;
        let c = if diverging { coolwarm(t) } else { viridis(t) };
        area.draw(&Rectangle::new([(x0 + i, y0), (x0 + i + 1, y1)], c.filled())).map_err(derr)?;
    }
    let right = TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    let left = TextStyle::from((FAMILY, 13).into_font()).pos(Pos::new(HPos::Left, VPos::Center));
    area.draw(&Text::new(format!("{vmin:.2}"), (x0 - 6, h as i32 / 2), right)).map_err(derr)?;
    area.draw(&Text::new(format!("{vmax:.2}"), (x0 + bar_w + 6, h as i32 / 2), left)).map_err(derr)?;
    Ok(())
}

fn draw_all<DB: DrawingBackend>(root: DrawingArea<DB, Shift>, title: &str, panels: &Panels) -> Result<()> {
    root.fill(&WHITE).map_err(derr)?;
    let root = root.titled(title, (FAMILY, 22)).map_err(derr)?;
    let (top, body) = root.split_vertically(30);
    let n = match panels {
        Panels::Lines(p, legend) => {
            draw_legend(&top, legend)?;
            p.len()
        }
        Panels::Heat(p, range) => {
            draw_colorbar(&top, *range, p.first().is_some_and(|x| x.diverging))?;
            p.len()
        }
        Panels::Bars(b) => {
            let legend: Vec<Series> = b
                .series
                .iter()
                .enumerate()
                .map(|(j, (label, _))| Series { label: label.clone(), points: Vec::new(), color: j, dashed: false })
                .collect();
            draw_legend(&top, &legend)?;
            return { draw_bars(&body, b)?; root.present().map_err(derr) };
        }
    };
    let areas = body.split_evenly(grid_shape(n));
    for (i, area) in areas.iter().enumerate().take(n) {
        match panels {
            Panels::Lines(p, _) => draw_lines(area, &p[i])?,
            Panels::Heat(p, _) => draw_heat(area, &p[i])?,
            Panels::Bars(b) => draw_bars(area, b)?,
        }
    }
    root.present().map_err(derr)?;
    Ok(())
}

fn size_for(n: usize, heat: bool) -> (u32, u32) {
    let (rows, cols) = grid_shape(n);
    let (w, h) = if heat { (420, 400) } else { (480, 340) };
    ((cols as u32 * w).max(720), rows as u32 * h + 70)
}

fn write_both(stem: &Path, title: &str, panels: Panels, size: (u32, u32)) -> Result<()> {
    ensure_font();
    let png = stem.with_extension("png");
    let svg = stem.with_extension("svg");
    // The bitmap encoder picks the format by the extension: the temporary name keeps it.
    let tmp_png = crate::io::AtomicPath::with_extension(&png, "png");
    draw_all(BitMapBackend::new(tmp_png.tmp(), size).into_drawing_area(), title, &panels)?;
    tmp_png.commit()?;
    let mut text = String::new();
    draw_all(SVGBackend::with_string(&mut text, size).into_drawing_area(), title, &panels)?;
    let out = crate::io::AtomicPath::new(&svg);
    std::fs::write(out.tmp(), text.as_bytes()).map_err(|e| Error::io(&svg, e))?;
    out.commit()
}

/// Writes `stem.png` and `stem.svg`: line panels in a grid under one shared legend (the
/// entries' labels, colours and dash styles).
pub fn line_figure(stem: &Path, title: &str, panels: &[LinePanel], legend: &[Series]) -> Result<()> {
    write_both(stem, title, Panels::Lines(panels, legend), size_for(panels.len(), false))
}

/// Writes `stem.png` and `stem.svg`: heatmap panels in a grid sharing one colour scale
/// `range` (shown as a colour bar).
pub fn heat_figure(stem: &Path, title: &str, panels: &[HeatPanel], range: (f64, f64)) -> Result<()> {
    let panels: Vec<HeatPanel> = panels.iter().cloned().map(|mut p| {
        p.vmin = range.0;
        p.vmax = range.1;
        p
    }).collect();
    write_both(stem, title, Panels::Heat(&panels, range), size_for(panels.len(), true))
}

/// Writes `stem.png` and `stem.svg`: one panel of grouped bars, the series named in a legend.
pub fn bar_figure(stem: &Path, title: &str, panel: &BarPanel) -> Result<()> {
    let w = (panel.categories.len() * (panel.series.len() * 22 + 24)).max(720) as u32;
    write_both(stem, title, Panels::Bars(panel), (w, 480))
}
