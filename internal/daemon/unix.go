package daemon

import (
	"fmt"
	"net"
	"os"
	"os/user"
	"strconv"
)

// socketGroup resolves a VM's socket_group (a group name or number); ""
// means none (-1).
func socketGroup(g string) (int, error) {
	if g == "" {
		return -1, nil
	}
	if id, err := strconv.Atoi(g); err == nil && id >= 0 {
		return id, nil
	}
	grp, err := user.LookupGroup(g)
	if err != nil {
		return -1, fmt.Errorf("socket_group: %w", err)
	}
	return strconv.Atoi(grp.Gid)
}

// listenUnix creates a vhost-user socket. Whoever can connect to it plays
// the VM's QEMU (its memory, its fabric identity), so it is 0600 (vsdpd's
// own user) unless gid names a group, which gets 0660; the mode is set
// right after bind, and the directory (RuntimeDirectoryMode 0750 in
// deploy/) closes that window.
func listenUnix(path string, gid int) (net.Listener, error) {
	os.Remove(path) // a stale socket from an earlier run; callers checked what it is
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		return nil, err
	}
	mode := os.FileMode(0o600)
	if gid >= 0 {
		mode = 0o660
		if err := os.Chown(path, -1, gid); err != nil {
			ln.Close()
			return nil, err
		}
	}
	if err := os.Chmod(path, mode); err != nil {
		ln.Close()
		return nil, err
	}
	return ln, nil
}
