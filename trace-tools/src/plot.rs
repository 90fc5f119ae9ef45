//! Drawing traces (offset × time) with plotters.
