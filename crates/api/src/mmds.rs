// SPDX-License-Identifier: Apache-2.0

//! `GET`, `PUT` and `PATCH /mmds` against the metadata store, with
//! Firecracker's statuses and messages; shared by the pre-boot and runtime
//! controllers.

use std::sync::{Arc, Mutex, MutexGuard};

use ember_mmds::{Mmds, MmdsError};
use serde_json::Value;

use crate::action::{ApiError, VmmData, VmmResponse};

/// The metadata store shared by the API and the network devices.
pub type SharedMmds = Arc<Mutex<Mmds>>;

pub(crate) fn lock(store: &SharedMmds) -> MutexGuard<'_, Mmds> {
    store.lock().unwrap_or_else(|e| e.into_inner())
}

/// Firecracker's fault for a store error: 413 when the store would exceed
/// its limit, else 400.
pub(crate) fn error(e: MmdsError) -> ApiError {
    match e {
        MmdsError::DataStoreLimitExceeded => {
            ApiError::new(413, format!("MMDS limit exceeded error: {e}"))
        }
        other => ApiError::bad_request(format!("MMDS error: {other}")),
    }
}

/// `GET /mmds`: the store, `{}` while it is empty.
pub(crate) fn get(store: &SharedMmds) -> VmmResponse {
    let value = match lock(store).data_store_value() {
        Value::Null => Value::Object(Default::default()),
        v => v.clone(),
    };
    Ok(VmmData::MmdsValue(value))
}

/// `PUT /mmds`.
pub(crate) fn put(store: &SharedMmds, value: Value) -> VmmResponse {
    lock(store).put_data(value).map_err(error)?;
    Ok(VmmData::Empty)
}

/// `PATCH /mmds`.
pub(crate) fn patch(store: &SharedMmds, value: &Value) -> VmmResponse {
    lock(store).patch_data(value).map_err(error)?;
    Ok(VmmData::Empty)
}
