//! settler
