package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"strconv"

	"golang.org/x/sys/unix"
)

func main() {
	listen := flag.Bool("l", false, "listen on PORT for one connection")
	localCID := flag.Bool("local-cid", false, "print the local CID and exit")
	flag.Parse()
	if err := run(*listen, *localCID, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "vsockcat:", err)
		os.Exit(1)
	}
}

func run(listen, localCID bool, args []string) error {
	if localCID {
		f, err := os.Open("/dev/vsock")
		if err != nil {
			return err
		}
		defer f.Close()
		cid, err := unix.IoctlGetUint32(int(f.Fd()), unix.IOCTL_VM_SOCKETS_GET_LOCAL_CID)
		if err != nil {
			return fmt.Errorf("IOCTL_VM_SOCKETS_GET_LOCAL_CID: %w", err)
		}
		fmt.Println(cid)
		return nil
	}
	var fd int
	var err error
	switch {
	case listen && len(args) == 1:
		fd, err = accept(args[0])
	case !listen && len(args) == 2:
		fd, err = dial(args[0], args[1])
	default:
		return errors.New("usage: vsockcat CID PORT | vsockcat -l PORT | vsockcat -local-cid")
	}
	if err != nil {
		return err
	}
	conn := os.NewFile(uintptr(fd), "vsock")
	defer conn.Close()
	sent := make(chan error, 1)
	go func() {
		_, err := io.CopyBuffer(conn, os.Stdin, make([]byte, 64<<10))
		if serr := unix.Shutdown(fd, unix.SHUT_WR); err == nil {
			err = serr
		}
		sent <- err
	}()
	if _, err := io.CopyBuffer(os.Stdout, conn, make([]byte, 64<<10)); err != nil {
		return fmt.Errorf("receiving: %w", err)
	}
	if err := <-sent; err != nil {
		return fmt.Errorf("sending: %w", err)
	}
	return nil
}

func parse(s string) (uint32, error) {
	v, err := strconv.ParseUint(s, 10, 32)
	if err != nil {
		return 0, fmt.Errorf("bad number %q", s)
	}
	return uint32(v), nil
}

func dial(cidArg, portArg string) (int, error) {
	cid, err := parse(cidArg)
	if err != nil {
		return -1, err
	}
	port, err := parse(portArg)
	if err != nil {
		return -1, err
	}
	fd, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	if err := unix.Connect(fd, &unix.SockaddrVM{CID: cid, Port: port}); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("connect %d:%d: %w", cid, port, err)
	}
	return fd, nil
}

func accept(portArg string) (int, error) {
	port, err := parse(portArg)
	if err != nil {
		return -1, err
	}
	l, err := unix.Socket(unix.AF_VSOCK, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("socket: %w", err)
	}
	defer unix.Close(l)
	if err := unix.Bind(l, &unix.SockaddrVM{CID: unix.VMADDR_CID_ANY, Port: port}); err != nil {
		return -1, fmt.Errorf("bind %d: %w", port, err)
	}
	if err := unix.Listen(l, 1); err != nil {
		return -1, fmt.Errorf("listen: %w", err)
	}
	fd, _, err := unix.Accept4(l, unix.SOCK_CLOEXEC)
	if err != nil {
		return -1, fmt.Errorf("accept: %w", err)
	}
	return fd, nil
}
