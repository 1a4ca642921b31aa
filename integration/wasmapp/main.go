//go:build wasip1

// Command wasmapp is the WASI test workload of containerd-kuasar's Wasm
// sandbox: one module, many behaviours, chosen by its first argument, so
// that every test shares one compilation. Built with
// GOOS=wasip1 GOARCH=wasm.
package main

import (
	"bufio"
	"fmt"
	"io"
	"net"
	"os"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
	"unsafe"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Println("hello from wasm")
		return
	}
	args := os.Args[2:]
	switch os.Args[1] {
	case "hello":
		wd, _ := os.Getwd()
		fmt.Printf("hello from wasm: args=%q cwd=%s\n", os.Args, wd)
	case "demo":
		host, _ := os.ReadFile("/etc/hostname")
		fmt.Printf("hello from WebAssembly: %s, pod %s", strings.Join(os.Args[2:], " "), host)
		entries, _ := os.ReadDir("/")
		var names []string
		for _, e := range entries {
			names = append(names, e.Name())
		}
		fmt.Println("my root file system:", strings.Join(names, " "))
		for {
			time.Sleep(time.Hour)
		}
	case "echo":
		fmt.Println(strings.Join(args, " "))
	case "stderr":
		fmt.Fprintln(os.Stderr, strings.Join(args, " "))
	case "env":
		env := os.Environ()
		sort.Strings(env)
		for _, kv := range env {
			fmt.Println(kv)
		}
	case "ls":
		entries, err := os.ReadDir(arg(args, 0, "/"))
		check(err)
		for _, e := range entries {
			fmt.Println(e.Name())
		}
	case "cat":
		b, err := os.ReadFile(arg(args, 0, ""))
		check(err)
		os.Stdout.Write(b)
	case "write":
		check(os.WriteFile(arg(args, 0, ""), []byte(arg(args, 1, "")), 0o644))
		fmt.Println("wrote", args[0])
	case "exit":
		n, _ := strconv.Atoi(arg(args, 0, "0"))
		fmt.Println("exiting with", n)
		os.Exit(n)
	case "sleep":
		fmt.Println("sleeping")
		if d := arg(args, 0, "inf"); d != "inf" {
			s, _ := strconv.ParseFloat(d, 64)
			time.Sleep(time.Duration(s * float64(time.Second)))
			fmt.Println("slept")
			return
		}
		for {
			time.Sleep(time.Hour)
		}
	case "tick":
		for i := 0; ; i++ {
			fmt.Println("tick", i)
			time.Sleep(100 * time.Millisecond)
		}
	case "loop":
		fmt.Println("looping")
		x := 0
		for {
			x++
		}
	case "hog":
		mb, _ := strconv.Atoi(arg(args, 0, "8"))
		var keep [][]byte
		for total := mb; ; total += mb {
			b := make([]byte, mb<<20)
			for i := range b {
				b[i] = byte(i)
			}
			keep = append(keep, b)
			fmt.Println("allocated MiB:", total)
			time.Sleep(10 * time.Millisecond)
		}
	case "hold":
		// hold N MiB, then sleep
		mb, _ := strconv.Atoi(arg(args, 0, "8"))
		b := make([]byte, mb<<20)
		for i := range b {
			b[i] = 1
		}
		fmt.Println("holding MiB:", mb)
		for {
			time.Sleep(time.Hour)
			b[0]++
		}
	case "stdin":
		n, err := io.Copy(os.Stdout, bufio.NewReader(os.Stdin))
		fmt.Printf("stdin closed after %d bytes (%v)\n", n, err)
	case "open":
		// open N times the file at path, keep them open, say how many
		// opened, then sleep
		n, _ := strconv.Atoi(arg(args, 0, "1"))
		var files []*os.File
		for i := 0; i < n; i++ {
			f, err := os.Open(arg(args, 1, "/"))
			if err != nil {
				break
			}
			files = append(files, f)
		}
		fmt.Printf("opened %d of %d\n", len(files), n)
		for {
			time.Sleep(time.Hour)
			fmt.Println(len(files))
		}
	case "poll-overflow":
		// A hostile poll_oneoff: a subscription count whose size wraps
		// around 32 bits. The host must refuse it, not fall over.
		var buf [64]byte
		var n uint32
		errno := pollOneoff(unsafe.Pointer(&buf[0]), unsafe.Pointer(&buf[0]), 4205488811, unsafe.Pointer(&n))
		fmt.Println("poll_oneoff errno", errno)
	case "trap":
		fmt.Println("trapping")
		p := (*byte)(unsafe.Pointer(uintptr(0xfffffff0)))
		*p = 1
	case "serve":
		// Serve HTTP on the first pre-opened listening socket (fd 3 when
		// the module has no pre-opened directory, 4 after "/").
		fd, _ := strconv.Atoi(arg(args, 0, "4"))
		// Non-blocking, so that accepting does not block the other
		// goroutines (WASI runs them all on one thread).
		check(syscall.SetNonblock(fd, true))
		l, err := net.FileListener(os.NewFile(uintptr(fd), "listener"))
		check(err)
		fmt.Println("serving on", l.Addr())
		for {
			c, err := l.Accept()
			check(err)
			fmt.Println("accepted", c.RemoteAddr())
			go func(c net.Conn) {
				defer c.Close()
				line, _ := bufio.NewReader(c).ReadString('\n')
				body := "hello from wasm over http: " + strings.TrimSpace(line) + "\n"
				fmt.Fprintf(c, "HTTP/1.0 200 OK\r\nContent-Length: %d\r\n\r\n%s", len(body), body)
			}(c)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown command", os.Args[1])
		os.Exit(64)
	}
}

func arg(args []string, i int, def string) string {
	if i < len(args) {
		return args[i]
	}
	return def
}

func check(err error) {
	if err != nil {
		fmt.Fprintln(os.Stderr, "error:", err)
		os.Exit(1)
	}
}

//go:wasmimport wasi_snapshot_preview1 poll_oneoff
func pollOneoff(in, out unsafe.Pointer, n uint32, nevents unsafe.Pointer) uint32
