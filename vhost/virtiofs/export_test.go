package virtiofs

// HandleForTest runs one request through the device's request handler,
// as a worker (or the hiprio ring) would, without a ring.
func (d *Device) HandleForTest(in, out [][]byte, hiprio bool) int {
	return d.handle(in, out, hiprio, nil)
}
