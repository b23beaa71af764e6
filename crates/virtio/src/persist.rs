// SPDX-License-Identifier: Apache-2.0

//! The state contract every virtio device and transport keeps: what it saves
//! for a snapshot and takes back on restore.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

/// A part of the machine whose guest-visible state goes into a snapshot.
///
/// `save` takes the state of a quiesced part (the VM paused, the device
/// drained); `restore` puts a saved state back into a part built fresh from
/// the same configuration, before it is activated. The state is plain data
/// and untrusted on the way back: `restore` validates every field against
/// the part it goes into and changes nothing when it refuses.
///
/// # Example
///
/// ```
/// use ember_virtio::Persist;
/// use serde::{Deserialize, Serialize};
///
/// #[derive(Default)]
/// struct Rng {
///     acked: u64,
/// }
///
/// #[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
/// struct RngState {
///     acked: u64,
/// }
///
/// #[derive(Debug, thiserror::Error)]
/// #[error("features {0:#x} were never offered")]
/// struct NotOffered(u64);
///
/// impl Persist for Rng {
///     type State = RngState;
///     type Error = NotOffered;
///     fn save(&self) -> RngState {
///         RngState { acked: self.acked }
///     }
///     fn restore(&mut self, state: &RngState) -> Result<(), NotOffered> {
///         if state.acked & !1 != 0 {
///             return Err(NotOffered(state.acked));
///         }
///         self.acked = state.acked;
///         Ok(())
///     }
/// }
///
/// let mut a = Rng::default();
/// a.acked = 1;
/// let mut b = Rng::default();
/// b.restore(&a.save()).unwrap();
/// assert_eq!(b.save(), a.save());
/// assert!(b.restore(&RngState { acked: 2 }).is_err());
/// ```
pub trait Persist {
    /// The guest-visible state, as plain serializable data.
    type State: Serialize + DeserializeOwned + Clone + Debug + PartialEq;
    /// Why a state was refused, naming the field and both values.
    type Error: std::error::Error + Send + Sync + 'static;

    /// The state of the quiesced part.
    fn save(&self) -> Self::State;

    /// Puts `state` back; nothing changes when it is refused.
    fn restore(&mut self, state: &Self::State) -> Result<(), Self::Error>;
}
