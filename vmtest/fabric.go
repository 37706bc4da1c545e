package vmtest

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/vsdp/vsdp/images"
)

// RXEDevice is the soft-RoCE device the fabric creates in each guest.
const RXEDevice = "rxe0"

// rxeTimeout bounds the wait for rxe0's port to become ACTIVE.
const rxeTimeout = 20 * time.Second

// SoftRoCE returns the image pieces for soft-RoCE in a guest: the rdma_rxe
// and rdma_ucm modules (crc32_generic comes with rdma_rxe), the rdma tool,
// ibv_devinfo, perftest and rping with their libraries and the loader, the
// rxe provider and its driver file, and libgcc_s (needed at thread exit).
// It fails when a host piece is missing (`make deps` installs them).
func SoftRoCE() (images.Spec, error) {
	providers, _ := filepath.Glob("/usr/lib/x86_64-linux-gnu/libibverbs/librxe-rdmav*.so")
	if len(providers) == 0 {
		return images.Spec{}, fmt.Errorf("%w: no rxe provider (ibverbs-providers)", ErrSetup)
	}
	s := images.Spec{
		Modules: []string{"rdma_rxe", "ib_uverbs", "rdma_ucm"},
		Binaries: []string{
			"/usr/bin/rdma", "/usr/bin/ibv_devinfo", "/usr/bin/rping",
			"/usr/bin/ib_write_bw", "/usr/bin/ib_write_lat",
			"/usr/bin/ib_read_bw", "/usr/bin/ib_read_lat",
			"/usr/bin/ib_send_bw", "/usr/bin/ib_send_lat",
		},
		Libraries: append(providers[len(providers)-1:], "/lib/x86_64-linux-gnu/libgcc_s.so.1"),
		Files:     []images.File{{Path: "/etc/libibverbs.d/rxe.driver", Host: "/etc/libibverbs.d/rxe.driver"}},
	}
	for _, p := range append(append([]string(nil), s.Binaries...), s.Libraries...) {
		if _, err := os.Stat(p); err != nil {
			return images.Spec{}, fmt.Errorf("%w: %v", ErrSetup, err)
		}
	}
	return s, nil
}

// FabricOptions describe a two-guest soft-RoCE fabric.
type FabricOptions struct {
	// Guest is the template of both guests. Its Name (default "fab") is a
	// prefix: the guests are NAME-a and NAME-b. SoftRoCE's pieces and a
	// NIC on the link are added to it.
	Guest Options
	// Link is the link's transport; default LinkStream.
	Link LinkKind
	// Subnet is the first three octets of the private /24 that exists only
	// on the link; default "10.9.0". The guests are .1 and .2.
	Subnet string
}

// Fabric is two guests joined by a QEMU link, each with rxe0 ACTIVE on its
// eth0.
type Fabric struct {
	Guests [2]*VM
	IPs    [2]string
	Link   LinkKind
	dir    string
}

var subnetRE = regexp.MustCompile(`^(10|192\.168|172\.(1[6-9]|2[0-9]|3[01]))(\.[0-9]{1,3}){1,2}$`)

// BootFabric boots the two guests concurrently and brings soft-RoCE up on
// both. On error everything is torn down. The caller must Close it.
func BootFabric(ctx context.Context, o FabricOptions) (*Fabric, error) {
	if o.Subnet == "" {
		o.Subnet = "10.9.0"
	}
	if !subnetRE.MatchString(o.Subnet) || strings.Count(o.Subnet, ".") != 2 {
		return nil, fmt.Errorf("vmtest: fabric subnet %q is not the first three octets of a private /24", o.Subnet)
	}
	if o.Guest.Name == "" {
		o.Guest.Name = "fab"
	}
	rdma, err := SoftRoCE()
	if err != nil {
		return nil, err
	}
	dir, err := os.MkdirTemp("", "vsdp-fab-")
	if err != nil {
		return nil, err
	}
	f := &Fabric{Link: o.Link, dir: dir, IPs: [2]string{o.Subnet + ".1", o.Subnet + ".2"}}
	opts := [2]Options{o.Guest, o.Guest}
	for i := range opts {
		g := &opts[i]
		g.Name = o.Guest.Name + "-" + string(rune('a'+i))
		g.Image = o.Guest.Image.Merge(rdma)
		link := &Link{Kind: o.Link}
		switch o.Link {
		case LinkStream:
			link.Path = filepath.Join(dir, "link.sock")
			link.Listen = i == 0
		case LinkDgram:
			link.Path = filepath.Join(dir, fmt.Sprintf("link-%d.sock", i))
			link.Peer = filepath.Join(dir, fmt.Sprintf("link-%d.sock", 1-i))
		default:
			os.RemoveAll(dir)
			return nil, fmt.Errorf("vmtest: unknown link kind %v", o.Link)
		}
		// The link NIC is eth0: it goes first.
		g.NICs = append([]NIC{{Link: link}}, o.Guest.NICs...)
	}

	// The stream listener must exist before the other side connects;
	// launch returns once QEMU's QMP is up, after its netdevs are.
	if f.Guests[0], err = launch(ctx, opts[0]); err != nil {
		f.Close()
		return nil, err
	}
	if f.Guests[1], err = launch(ctx, opts[1]); err != nil {
		f.Close()
		return nil, err
	}
	var wg sync.WaitGroup
	errs := make([]error, 2)
	for i, v := range f.Guests {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if errs[i] = v.ready(ctx); errs[i] == nil {
				errs[i] = upRXE(ctx, v, f.IPs[i])
			}
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// upRXE configures eth0 and creates rxe0 on it.
func upRXE(ctx context.Context, v *VM, ip string) error {
	script := fmt.Sprintf("set -e; ip link set eth0 up; ip addr add %s/24 dev eth0; rdma link add %s type rxe netdev eth0", ip, RXEDevice)
	if _, err := v.Run(ctx, "sh", "-c", script); err != nil {
		return &BootError{VM: v.Name, Reason: "soft-RoCE setup", Console: v.Console, Err: err}
	}
	if err := WaitRXE(ctx, v, rxeTimeout); err != nil {
		return &BootError{VM: v.Name, Reason: "soft-RoCE port", Console: v.Console, Err: err}
	}
	return nil
}

// WaitRXE waits until ibv_devinfo shows rxe0's port ACTIVE in v.
func WaitRXE(ctx context.Context, v *VM, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	var last string
	for {
		r, err := v.Exec(ctx, Cmd{Args: []string{"ibv_devinfo", "-d", RXEDevice}, Timeout: 10 * time.Second})
		if err == nil {
			last = strings.TrimSpace(string(r.Stdout) + string(r.Stderr))
			if r.ExitCode == 0 && strings.Contains(last, "PORT_ACTIVE") {
				return nil
			}
		} else if ctx.Err() == nil {
			return err
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("vmtest: %s: %s not ACTIVE after %v; ibv_devinfo said: %s", v.Name, RXEDevice, timeout, last)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// Close closes both guests; it is idempotent.
func (f *Fabric) Close() error {
	var errs []error
	for _, v := range f.Guests {
		if v != nil {
			errs = append(errs, v.Close())
		}
	}
	os.RemoveAll(f.dir)
	return errors.Join(errs...)
}

// StartFabric boots a fabric for a test, closed in t.Cleanup (console logs
// printed if the test failed). A failure fails the test.
func StartFabric(t testing.TB, o FabricOptions) *Fabric {
	t.Helper()
	o.Guest.LogDir = TestLogDir(t)
	f, err := BootFabric(context.Background(), o)
	if err != nil {
		name := o.Guest.Name
		if name == "" {
			name = "fab"
		}
		for _, s := range []string{"-a", "-b"} {
			console, qlog := logPaths(o.Guest.LogDir, name+s)
			logTails(t, name+s, console, qlog)
		}
		t.Fatal(err)
	}
	t.Cleanup(func() {
		for _, v := range f.Guests {
			closeForTest(t, v)
		}
		f.Close()
	})
	return f
}
