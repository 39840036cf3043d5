//! flashsale load tests: goose scenarios (`rush`, `steady`, `retry-storm`, `browse-buy`)
//! against any running flashsale endpoint.
//!
//! Not built yet: the scenarios arrive with the load-test issue. Until then
//! `flashsale demo` drives a whole sale through the real HTTP endpoint.
