//! One vde_switch per VLAN (being written).
