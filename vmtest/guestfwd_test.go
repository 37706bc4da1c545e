package vmtest

import (
	"slices"
	"strings"
	"testing"
)

func TestGuestForwardArgs(t *testing.T) {
	o := Options{Name: "g", NICs: []NIC{{User: &UserNet{GuestForwards: []GuestForward{
		{Port: 80, HostPort: 8080},
		{Addr: "10.0.2.101", Port: 7, HostPort: 7007},
	}}}}}.withDefaults()
	args := o.qemuArgs(paths{kernel: "k", initrd: "i", console: "c", qmp: "q", agent: "a"}, "tcg")
	i := slices.Index(args, "-netdev")
	if i < 0 {
		t.Fatalf("no -netdev in %q", args)
	}
	want := "user,id=net0,restrict=on" +
		",guestfwd=tcp:10.0.2.100:80-cmd:socat STDIO TCP:127.0.0.1:8080" +
		",guestfwd=tcp:10.0.2.101:7-cmd:socat STDIO TCP:127.0.0.1:7007"
	if args[i+1] != want {
		t.Errorf("-netdev %q\nwant     %q", args[i+1], want)
	}
}

func TestGuestForwardValidate(t *testing.T) {
	for _, r := range []struct {
		g   GuestForward
		err string
	}{
		{GuestForward{Port: 80, HostPort: 8080}, ""},
		{GuestForward{Addr: "10.0.2.100", Port: 1, HostPort: 65535}, ""},
		{GuestForward{Port: 0, HostPort: 8080}, "out of range"},
		{GuestForward{Port: 80, HostPort: 65536}, "out of range"},
		{GuestForward{Addr: "10.0.3.100", Port: 80, HostPort: 8080}, "address"},
		{GuestForward{Addr: "10.0.2.2", Port: 80, HostPort: 8080}, "address"}, // slirp's host alias
		{GuestForward{Addr: "10.0.2.255", Port: 80, HostPort: 8080}, "address"},
		{GuestForward{Addr: "10.0.2.0100", Port: 80, HostPort: 8080}, "address"},
		{GuestForward{Addr: "10.0.2.1,x", Port: 80, HostPort: 8080}, "address"},
	} {
		o := Options{NICs: []NIC{{User: &UserNet{GuestForwards: []GuestForward{r.g}}}}}.withDefaults()
		err := o.validate()
		if (err == nil) != (r.err == "") || err != nil && !strings.Contains(err.Error(), r.err) {
			t.Errorf("%+v: %v, want %q", r.g, err, r.err)
		}
	}
}
