#[derive(clap::Args)]
pub struct DoctorArgs {}
pub fn run(_: DoctorArgs) -> i32 { 0 }
