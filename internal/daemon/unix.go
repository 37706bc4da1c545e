package daemon

import "net"

func listenUnix(path string) (net.Listener, error) {
	return net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
}
