fn main() {
    println!("ensueno");
}
