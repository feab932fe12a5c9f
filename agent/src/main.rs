fn main() {
    println!("husk-agent ready");
}
