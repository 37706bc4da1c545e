package daemon_test

import (
	"bufio"
	"encoding/xml"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vsdp/vsdp/internal/daemon"
)

// libvirtDomain is the part of a libvirt domain the example wires to vsdpd.
type libvirtDomain struct {
	Name    string `xml:"name"`
	Backing struct {
		Source struct {
			Type string `xml:"type,attr"`
		} `xml:"source"`
		Access struct {
			Mode string `xml:"mode,attr"`
		} `xml:"access"`
	} `xml:"memoryBacking"`
	FS []struct {
		Driver struct {
			Type  string `xml:"type,attr"`
			Queue int    `xml:"queue,attr"`
		} `xml:"driver"`
		Source struct {
			Socket string `xml:"socket,attr"`
		} `xml:"source"`
		Target struct {
			Dir string `xml:"dir,attr"`
		} `xml:"target"`
	} `xml:"devices>filesystem"`
	Args []struct {
		Value string `xml:"value,attr"`
	} `xml:"http://libvirt.org/schemas/domain/qemu/1.0 commandline>arg"`
}

// TestDeployExamples keeps deploy/ true: the example configuration loads
// and starts, the libvirt domain points QEMU at that configuration's
// sockets with shared memfd memory and a 1024-entry virtio-fs queue, and
// the systemd unit starts vsdpd on that configuration's path with the
// runtime directory its sockets live in.
func TestDeployExamples(t *testing.T) {
	dir := filepath.Join("..", "..", "deploy")
	cfg, err := daemon.LoadConfig(filepath.Join(dir, "vsdpd.json"))
	if err != nil {
		t.Fatal(err)
	}
	if len(cfg.VMs) == 0 {
		t.Fatal("the example configures no VM")
	}
	vm := cfg.VMs[0]

	// The configuration starts (its sockets moved to a test directory).
	run := t.TempDir()
	started := *cfg
	started.Exports = nil // the example's target service is not running here
	started.VMs = []daemon.VMConfig{vm}
	started.VMs[0].Socket = filepath.Join(run, filepath.Base(vm.Socket))
	started.VMs[0].FSSocket = filepath.Join(run, filepath.Base(vm.FSSocket))
	// libvirt runs QEMU as libvirt-qemu, group kvm: the sockets must
	// admit that group. Here the test's own group stands in for it.
	if vm.SocketGroup != "kvm" {
		t.Errorf("socket_group %q: libvirt's QEMU (group kvm) could not connect", vm.SocketGroup)
	}
	gid := os.Getgid()
	started.VMs[0].SocketGroup = strconv.Itoa(gid)
	startDaemon(t, &started)
	for _, s := range []string{started.VMs[0].Socket, started.VMs[0].FSSocket} {
		fi, err := os.Stat(s)
		if err != nil || fi.Mode()&os.ModeSocket == 0 {
			t.Fatalf("%s: %v, want a socket", s, err)
		}
		if fi.Mode().Perm() != 0o660 || int(fi.Sys().(*syscall.Stat_t).Gid) != gid {
			t.Fatalf("%s: mode %v group %d, want 0660 and group %d", s, fi.Mode().Perm(), fi.Sys().(*syscall.Stat_t).Gid, gid)
		}
	}

	b, err := os.ReadFile(filepath.Join(dir, "libvirt-domain.xml"))
	if err != nil {
		t.Fatal(err)
	}
	var dom libvirtDomain
	if err := xml.Unmarshal(b, &dom); err != nil {
		t.Fatalf("libvirt-domain.xml: %v", err)
	}
	if dom.Name != vm.Name || dom.Backing.Source.Type != "memfd" || dom.Backing.Access.Mode != "shared" {
		t.Errorf("domain %q, memory backing %+v: want %q with shared memfd memory", dom.Name, dom.Backing, vm.Name)
	}
	if len(dom.FS) != 1 || dom.FS[0].Driver.Type != "virtiofs" || dom.FS[0].Driver.Queue != 1024 ||
		dom.FS[0].Source.Socket != vm.FSSocket || dom.FS[0].Target.Dir != "vsdpnet" {
		t.Errorf("filesystem %+v: want virtiofs, queue 1024, socket %s, tag vsdpnet", dom.FS, vm.FSSocket)
	}
	var args []string
	for _, a := range dom.Args {
		args = append(args, a.Value)
	}
	cmdline := strings.Join(args, " ")
	if !strings.Contains(cmdline, "path="+vm.Socket) || !strings.Contains(cmdline, "vhost-user-vsock-pci") {
		t.Errorf("qemu:commandline %q lacks the vsock socket %s", cmdline, vm.Socket)
	}

	unit := map[string]string{}
	f, err := os.Open(filepath.Join(dir, "vsdpd.service"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), "="); ok && !strings.HasPrefix(k, "#") {
			unit[k] = v
		}
	}
	if !strings.Contains(unit["ExecStart"], "-config /etc/vsdp/vsdpd.json") {
		t.Errorf("ExecStart %q does not use /etc/vsdp/vsdpd.json", unit["ExecStart"])
	}
	if rd := "/run/" + unit["RuntimeDirectory"]; filepath.Dir(vm.Socket) != rd || !strings.Contains(unit["ReadWritePaths"], rd) {
		t.Errorf("runtime directory %s (writable: %q) does not hold the sockets %s", rd, unit["ReadWritePaths"], vm.Socket)
	}
	if !strings.Contains(unit["Before"], "libvirtd.service") {
		t.Errorf("the unit does not start before libvirtd: QEMU needs the sockets first")
	}
}

// TestSocketPermissions: a VM's vhost-user sockets admit only vsdpd's user
// (0600) unless socket_group names a group (0660); a group that does not
// exist stops the start with a clear error.
func TestSocketPermissions(t *testing.T) {
	dir := t.TempDir()
	vm := daemon.VMConfig{Name: "vm", Socket: filepath.Join(dir, "vm.sock"), FSSocket: filepath.Join(dir, "fs.sock"),
		CID: 9, Addr: "10.54.0.9"}
	startDaemon(t, &daemon.Config{Fabric: daemon.Fabric{Addr: "10.54.0.1"}, VMs: []daemon.VMConfig{vm}})
	for _, s := range []string{vm.Socket, vm.FSSocket} {
		if fi, err := os.Stat(s); err != nil || fi.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v %v, want mode 0600", s, fi.Mode().Perm(), err)
		}
	}
	vm.Socket, vm.FSSocket, vm.SocketGroup = filepath.Join(dir, "vm2.sock"), "", "no-such-group-vsdp"
	d, err := daemon.Start(&daemon.Config{Fabric: daemon.Fabric{Addr: "10.54.0.1"}, VMs: []daemon.VMConfig{vm}}, quietLog())
	if err == nil {
		d.Close()
		t.Fatal("started with a group that does not exist")
	}
	if !strings.Contains(err.Error(), "socket_group") {
		t.Fatalf("error %q does not name socket_group", err)
	}
}
