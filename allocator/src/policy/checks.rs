//! The checks of request fields and their limits (`parse_*`): what turns a
//! client's text into the checked values of [`crate::model`]. No I/O.

use std::{collections::BTreeMap, net::IpAddr};

use crate::error::{Result, invalid};

/// Longest owner, in bytes.
pub const MAX_OWNER_BYTES: usize = 256;
/// Most labels on one allocation.
pub const MAX_LABELS: usize = 32;
/// Longest label key, in bytes.
pub const MAX_LABEL_KEY_BYTES: usize = 128;
/// Longest label value, in bytes.
pub const MAX_LABEL_VALUE_BYTES: usize = 512;
/// Default and largest List page.
pub const DEFAULT_PAGE_SIZE: usize = 100;
/// Largest List page.
pub const MAX_PAGE_SIZE: usize = 1000;

/// Checks an owner: 1 to 256 bytes, no control characters.
pub fn parse_owner(field: &'static str, value: &str) -> Result<String> {
    if value.is_empty() {
        return Err(invalid(field, value, "must not be empty"));
    }
    if value.len() > MAX_OWNER_BYTES {
        return Err(invalid(
            field,
            value,
            format!("longer than {MAX_OWNER_BYTES} bytes"),
        ));
    }
    if value.chars().any(char::is_control) {
        return Err(invalid(field, value, "contains control characters"));
    }
    Ok(value.to_string())
}

/// Parses an address in text form; refuses the unspecified addresses.
pub fn parse_address(field: &'static str, value: &str) -> Result<IpAddr> {
    let ip: IpAddr = value
        .trim()
        .parse()
        .map_err(|_| invalid(field, value, "not an IPv4 or IPv6 address"))?;
    if ip.is_unspecified() {
        return Err(invalid(
            field,
            value,
            "the unspecified address cannot be allocated",
        ));
    }
    Ok(ip)
}

/// Checks a pool name (a DNS label).
pub fn parse_pool(field: &'static str, value: &str) -> Result<String> {
    if !vipam::names::is_pool_name(value) {
        return Err(invalid(
            field,
            value,
            format!("not a pool name ({})", vipam::names::POOL_NAME_RULE),
        ));
    }
    Ok(value.to_string())
}

/// Checks labels: at most 32, keys of 1 to 128 bytes, values of at most 512
/// bytes, no control characters.
pub fn parse_labels(
    labels: impl IntoIterator<Item = (String, String)>,
) -> Result<BTreeMap<String, String>> {
    let labels: BTreeMap<String, String> = labels.into_iter().collect();
    if labels.len() > MAX_LABELS {
        return Err(invalid(
            "labels",
            &format!("{} labels", labels.len()),
            format!("at most {MAX_LABELS} labels"),
        ));
    }
    for (k, v) in &labels {
        if k.is_empty() || k.len() > MAX_LABEL_KEY_BYTES || k.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                k,
                format!("a label key has 1 to {MAX_LABEL_KEY_BYTES} bytes, no control characters"),
            ));
        }
        if v.len() > MAX_LABEL_VALUE_BYTES || v.chars().any(char::is_control) {
            return Err(invalid(
                "labels",
                v,
                format!(
                    "a label value has at most {MAX_LABEL_VALUE_BYTES} bytes, no control characters"
                ),
            ));
        }
    }
    Ok(labels)
}
