package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"golang.org/x/sys/unix"

	"github.com/vsdp/vsdp/vmtest/internal/agent"
	"github.com/vsdp/vsdp/vmtest/internal/proto"
)

func main() {
	port := flag.String("port", "vsdp.agent", "virtio-serial port name, or a device path")
	flag.Parse()
	if err := serve(*port); err != nil {
		fmt.Fprintln(os.Stderr, "vsdp-agent:", err)
		os.Exit(1)
	}
}

// findPort returns the device node of the virtio-serial port named name,
// waiting up to 10 s for it to appear.
func findPort(name string) (string, error) {
	deadline := time.Now().Add(10 * time.Second)
	for {
		ents, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range ents {
			b, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(b)) == name {
				return "/dev/" + e.Name(), nil
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %q", name)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func serve(port string) error {
	if !strings.HasPrefix(port, "/") {
		p, err := findPort(port)
		if err != nil {
			return err
		}
		port = p
	}
	f, err := os.OpenFile(port, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	// Through SyscallConn, not Fd, so the tty stays on the netpoller.
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var rawErr error
	if err := rc.Control(func(fd uintptr) { rawErr = makeRaw(int(fd)) }); err != nil {
		return err
	}
	if rawErr != nil && !errors.Is(rawErr, unix.ENOTTY) { // a virtio port is no tty
		return fmt.Errorf("%s: %w", port, rawErr)
	}
	var uts unix.Utsname
	unix.Uname(&uts)
	srv := &agent.Server{
		Hello: proto.Hello{
			Version: proto.Version,
			Kernel:  unix.ByteSliceToString(uts.Release[:]),
			PID:     os.Getpid(),
			Start:   time.Now().UnixNano(),
		},
		Poweroff: func() error {
			unix.Sync()
			time.Sleep(50 * time.Millisecond) // let the reply drain out of the UART
			return unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
		},
	}
	return srv.Serve(context.Background(), f)
}

// makeRaw puts the tty in raw mode (as cfmakeraw, plus no software or
// hardware flow control: frames are binary) and drops anything received
// before the agent started.
func makeRaw(fd int) error {
	t, err := unix.IoctlGetTermios(fd, unix.TCGETS)
	if err != nil {
		return err
	}
	t.Iflag &^= unix.IGNBRK | unix.BRKINT | unix.PARMRK | unix.ISTRIP | unix.INLCR | unix.IGNCR | unix.ICRNL | unix.IXON | unix.IXOFF | unix.IXANY
	t.Oflag &^= unix.OPOST
	t.Lflag &^= unix.ECHO | unix.ECHONL | unix.ICANON | unix.ISIG | unix.IEXTEN
	t.Cflag &^= unix.CSIZE | unix.PARENB | unix.CRTSCTS
	t.Cflag |= unix.CS8 | unix.CLOCAL | unix.CREAD
	// The fastest rate of a standard 8250 port. QEMU does not pace the
	// bytes, but its receive FIFO timeout is counted in character times.
	t.Cflag &^= unix.CBAUD
	t.Cflag |= unix.B115200
	t.Ispeed, t.Ospeed = unix.B115200, unix.B115200
	t.Cc[unix.VMIN] = 1
	t.Cc[unix.VTIME] = 0
	if err := unix.IoctlSetTermios(fd, unix.TCSETS, t); err != nil {
		return err
	}
	return unix.IoctlSetInt(fd, unix.TCFLSH, unix.TCIOFLUSH)
}
