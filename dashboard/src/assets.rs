//! The dashboard's pages, script and style, and the vendored uPlot, all
//! compiled into the binary.
//!
//! uPlot (MIT, `assets/vendor/uplot-1.6.32`, the npm package's `dist` files
//! unchanged): a small, fast, dependency-free time-series chart library. It
//! draws on a canvas and keeps up with thousands of points per series, which
//! is what step-indexed training curves are; ECharts is ten times its size.

pub const JOBS_HTML: &str = include_str!("../assets/jobs.html");
pub const JOB_HTML: &str = include_str!("../assets/job.html");
pub const LOGIN_HTML: &str = include_str!("../assets/login.html");

const FILES: &[(&str, &str, &str)] = &[
    ("dashboard.js", "text/javascript; charset=utf-8", include_str!("../assets/dashboard.js")),
    ("dashboard.css", "text/css; charset=utf-8", include_str!("../assets/dashboard.css")),
    ("uPlot.iife.min.js", "text/javascript; charset=utf-8", include_str!("../assets/vendor/uplot-1.6.32/uPlot.iife.min.js")),
    ("uPlot.min.css", "text/css; charset=utf-8", include_str!("../assets/vendor/uplot-1.6.32/uPlot.min.css")),
];

/// An asset by file name: its content type and body.
pub fn get(name: &str) -> Option<(&'static str, &'static str)> {
    FILES.iter().find(|(n, _, _)| *n == name).map(|(_, mime, body)| (*mime, *body))
}
