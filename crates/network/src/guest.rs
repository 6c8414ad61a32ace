//! Configuring attest's own guests for their networks (being written).
