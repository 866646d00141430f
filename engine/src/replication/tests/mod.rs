mod frame_golden;
mod receiver;
