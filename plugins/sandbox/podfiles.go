package sandbox

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// WritePodFiles writes the hostname, hosts and resolv.conf files CRI mounts
// into every container of the pod, in sb.CRIRootDir.
func WritePodFiles(sb *Sandbox) error {
	if err := os.MkdirAll(sb.CRIRootDir, 0o755); err != nil {
		return err
	}
	hostname := sb.Config.GetHostname()
	if hostname == "" {
		var err error
		if hostname, err = os.Hostname(); err != nil {
			return err
		}
	}
	if err := os.WriteFile(filepath.Join(sb.CRIRootDir, "hostname"), []byte(hostname+"\n"), 0o644); err != nil {
		return err
	}
	hosts, err := os.ReadFile("/etc/hosts")
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	if err := os.WriteFile(filepath.Join(sb.CRIRootDir, "hosts"), hosts, 0o644); err != nil {
		return err
	}
	var resolv []byte
	if dns := sb.Config.GetDnsConfig(); dns != nil {
		resolv = []byte(ResolvConf(dns.Servers, dns.Searches, dns.Options))
	} else if resolv, err = os.ReadFile("/etc/resolv.conf"); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return os.WriteFile(filepath.Join(sb.CRIRootDir, "resolv.conf"), resolv, 0o644)
}

// ResolvConf renders a resolv.conf from CRI's DNS config.
func ResolvConf(servers, searches, options []string) string {
	var b strings.Builder
	if len(searches) > 0 {
		fmt.Fprintf(&b, "search %s\n", strings.Join(searches, " "))
	}
	for _, s := range servers {
		fmt.Fprintf(&b, "nameserver %s\n", s)
	}
	if len(options) > 0 {
		fmt.Fprintf(&b, "options %s\n", strings.Join(options, " "))
	}
	return b.String()
}

// RemovePodFiles removes CRI's directories of the pod.
func RemovePodFiles(sb *Sandbox) error {
	var errs []error
	for _, d := range []string{sb.CRIRootDir, sb.CRIStateDir} {
		if err := os.RemoveAll(d); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}
