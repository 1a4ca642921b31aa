package images

import (
	_ "embed"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// The images critest (cri-tools v1.34.0) pulls, under their original
// names. The stand-ins behave like the originals where critest looks.
const (
	E2EBusybox   = "registry.k8s.io/e2e-test-images/busybox:1.29-2"
	E2ENginx     = "registry.k8s.io/e2e-test-images/nginx:1.14-2"
	E2EHttpd     = "registry.k8s.io/e2e-test-images/httpd:2.4.39-4"
	E2ENoNewPriv = "registry.k8s.io/e2e-test-images/nonewprivs:1.3"

	criToolsRegistry = "gcr.io/k8s-staging-cri-tools/"
	HostNetNginx     = criToolsRegistry + "hostnet-nginx-amd64"
	PredefinedGroup  = criToolsRegistry + "test-image-predefined-group"
)

// critestPath is the PATH of the e2e images (the busybox image's).
const critestPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// CritestBuilders maps every image critest pulls to its builder, except
// gcr.io/k8s-staging-cri-tools/test-image-digest, which critest pins by a
// digest of the original registry that no local build can reproduce.
var CritestBuilders = map[string]func() (v1.Image, error){
	E2EBusybox:   BuildE2EBusybox,
	E2ENginx:     func() (v1.Image, error) { return buildNginx(80) },
	HostNetNginx: func() (v1.Image, error) { return buildNginx(12003) },
	E2EHttpd:     BuildHttpd,
	E2ENoNewPriv: BuildNoNewPrivs,

	PredefinedGroup: BuildPredefinedGroup,
	// Image status reports the image's user: uid or name, with or
	// without a group.
	criToolsRegistry + "test-image-user-uid":            userImage("1002"),
	criToolsRegistry + "test-image-user-username":       userImage("www-data"),
	criToolsRegistry + "test-image-user-uid-group":      userImage("1003:users"),
	criToolsRegistry + "test-image-user-username-group": userImage("www-data:users"),
	// Pull and remove by every kind of reference; three tags of one image
	// and three different images.
	criToolsRegistry + "test-image-latest":   markedImage("test-image-latest"),
	criToolsRegistry + "test-image-tag:test": markedImage("test-image-tag:test"),
	criToolsRegistry + "test-image-tag:all":  markedImage("test-image-tag:all"),
	criToolsRegistry + "test-image-1:latest": markedImage("test-image-1"),
	criToolsRegistry + "test-image-2:latest": markedImage("test-image-2"),
	criToolsRegistry + "test-image-3:latest": markedImage("test-image-3"),
	criToolsRegistry + "test-image-tags:1":   markedImage("test-image-tags"),
	criToolsRegistry + "test-image-tags:2":   markedImage("test-image-tags"),
	criToolsRegistry + "test-image-tags:3":   markedImage("test-image-tags"),
}

// e2eUsers and e2eGroups are the accounts of the busybox image.
const (
	e2eUsers = `root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
`
	e2eGroups = `root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
staff:x:50:
users:x:100:
nogroup:x:65534:
`
)

// e2eBusyboxLayer is the root of every e2e stand-in: Debian's dynamic
// busybox (its shell runs applets from the file system, as the original's
// does, so a masked /bin/ls cannot run; Debian's static busybox runs them
// in-process), every applet a hard link in /bin as in the original, the
// C library it needs, and the procps pgrep and util-linux ipcs the
// original has as applets.
var e2eBusyboxLayer = sync.OnceValues(func() (v1.Layer, error) {
	busybox, err := debFile("busybox", "/bin/busybox")
	if err != nil {
		return nil, err
	}
	applets, err := busyboxApplets(busybox)
	if err != nil {
		return nil, err
	}
	exes := map[string][]byte{"/bin/busybox": busybox}
	for _, tool := range []string{"/usr/bin/pgrep", "/usr/bin/ipcs"} {
		if exes[tool], err = os.ReadFile(tool); err != nil {
			return nil, fmt.Errorf("%w (install procps and util-linux)", err)
		}
	}
	files, err := dynamicFiles(exes)
	if err != nil {
		return nil, err
	}
	for _, a := range applets {
		if p := "/bin/" + a; p != "/bin/busybox" {
			files = append(files, File{Path: p, HardLink: "/bin/busybox"})
		}
	}
	for _, d := range []string{"/etc", "/root", "/home", "/var", "/var/www", "/var/spool", "/var/spool/mail", "/usr/sbin", "/usr/local/bin", "/sbin", "/dev", "/proc", "/sys"} {
		files = append(files, File{Path: d, Dir: true, Mode: 0o755})
	}
	files = append(files,
		File{Path: "/tmp", Dir: true, Mode: 0o1777},
		File{Path: "/etc/passwd", Mode: 0o644, Data: []byte(e2eUsers)},
		File{Path: "/etc/group", Mode: 0o644, Data: []byte(e2eGroups)},
	)
	return Layer(withParents(files))
})

// busyboxApplets lists the applets of a busybox binary by running it.
func busyboxApplets(busybox []byte) ([]string, error) {
	dir, err := os.MkdirTemp("", "busybox")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	bin := filepath.Join(dir, "busybox")
	if err := os.WriteFile(bin, busybox, 0o755); err != nil {
		return nil, err
	}
	out, err := exec.Command(bin, "--list").Output()
	if err != nil {
		return nil, fmt.Errorf("listing busybox applets: %w", err)
	}
	return strings.Fields(string(out)), nil
}

// e2eImage is the busybox root plus layers of files, with cfg.
func e2eImage(cfg v1.Config, files ...[]File) (v1.Image, error) {
	base, err := e2eBusyboxLayer()
	if err != nil {
		return nil, err
	}
	layers := []v1.Layer{base}
	for _, fs := range files {
		l, err := Layer(withParents(fs))
		if err != nil {
			return nil, err
		}
		layers = append(layers, l)
	}
	if cfg.Env == nil {
		cfg.Env = []string{critestPath}
	}
	return Image(cfg, layers...)
}

// BuildE2EBusybox is registry.k8s.io/e2e-test-images/busybox:1.29-2.
func BuildE2EBusybox() (v1.Image, error) {
	return e2eImage(v1.Config{Cmd: []string{"sh"}})
}

//go:embed webserver.c.txt
var webServerSource []byte

var webServer = sync.OnceValues(func() ([]byte, error) { return compileC("webserver", webServerSource) })

// buildNginx is the e2e nginx image, its web server on port.
func buildNginx(port int) (v1.Image, error) {
	server, err := webServer()
	if err != nil {
		return nil, err
	}
	return e2eImage(v1.Config{
		Cmd:          []string{"nginx", "-g", "daemon off;"},
		Env:          []string{critestPath, "NGINX_VERSION=1.14.2"},
		ExposedPorts: map[string]struct{}{fmt.Sprintf("%d/tcp", port): {}},
		StopSignal:   "SIGTERM",
	}, []File{
		{Path: "/usr/sbin/nginx", Mode: 0o755, Data: server},
		{Path: "/etc/nginx/conf.d/default.conf", Mode: 0o644, Data: []byte(fmt.Sprintf(
			"server {\n    listen %d;\n    location / {\n        root /usr/share/nginx/html;\n        index index.html;\n    }\n}\n", port))},
		{Path: "/usr/share/nginx/html/index.html", Mode: 0o644, Data: []byte(
			"<!DOCTYPE html>\n<html>\n<head><title>Welcome to nginx!</title></head>\n<body><h1>Welcome to nginx!</h1></body>\n</html>\n")},
		{Path: "/var/run", Dir: true, Mode: 0o755},
		{Path: "/var/log/nginx", Dir: true, Mode: 0o755},
	})
}

// BuildHttpd is registry.k8s.io/e2e-test-images/httpd:2.4.39-4.
func BuildHttpd() (v1.Image, error) {
	server, err := webServer()
	if err != nil {
		return nil, err
	}
	const prefix = "/usr/local/apache2"
	return e2eImage(v1.Config{
		Cmd:          []string{"httpd-foreground"},
		Env:          []string{"PATH=" + prefix + "/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HTTPD_PREFIX=" + prefix, "HTTPD_VERSION=2.4.39"},
		WorkingDir:   prefix,
		ExposedPorts: map[string]struct{}{"80/tcp": {}},
		StopSignal:   "SIGWINCH",
	}, []File{
		{Path: prefix + "/bin/httpd", Mode: 0o755, Data: server},
		{Path: prefix + "/bin/httpd-foreground", Mode: 0o755, Data: []byte(
			"#!/bin/sh\nset -e\n\n# a stale pid file keeps httpd from starting\nrm -f " + prefix + "/logs/httpd.pid\n\nexec httpd -DFOREGROUND \"$@\"\n")},
		{Path: prefix + "/htdocs/index.html", Mode: 0o644, Data: []byte("<html><body><h1>It works!</h1></body></html>\n")},
		{Path: prefix + "/logs", Dir: true, Mode: 0o755},
	})
}

//go:embed nnp.c.txt
var nnpSource []byte

// BuildNoNewPrivs is registry.k8s.io/e2e-test-images/nonewprivs:1.3: a
// set-user-ID root program that prints its effective uid.
func BuildNoNewPrivs() (v1.Image, error) {
	nnp, err := compileC("nnp", nnpSource)
	if err != nil {
		return nil, err
	}
	return e2eImage(v1.Config{Entrypoint: []string{"/usr/local/bin/nnp"}},
		[]File{{Path: "/usr/local/bin/nnp", Mode: 0o4755, Data: nnp}})
}

// BuildPredefinedGroup is test-image-predefined-group: its user
// default-user (uid 1000) belongs to group-defined-in-image (gid 50000) in
// the image's /etc/group.
func BuildPredefinedGroup() (v1.Image, error) {
	return e2eImage(v1.Config{Cmd: []string{"sh"}, User: "1000"}, []File{
		{Path: "/etc/passwd", Mode: 0o644, Data: []byte(e2eUsers + "default-user:x:1000:1000::/home/default-user:/bin/sh\n")},
		{Path: "/etc/group", Mode: 0o644, Data: []byte(e2eGroups + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n")},
		{Path: "/home/default-user", Dir: true, Mode: 0o755},
	})
}

// userImage is an image whose config names user (critest only reads its
// status).
func userImage(user string) func() (v1.Image, error) {
	return func() (v1.Image, error) {
		return e2eImage(v1.Config{Cmd: []string{"sh"}, User: user})
	}
}

// markedImage is a small image of its own: images built with the same
// mark are identical (one image under several tags).
func markedImage(mark string) func() (v1.Image, error) {
	return func() (v1.Image, error) {
		l, err := Layer([]File{{Path: "/etc", Dir: true, Mode: 0o755}, {Path: "/etc/test-image", Mode: 0o644, Data: []byte(mark + "\n")}})
		if err != nil {
			return nil, err
		}
		return Image(v1.Config{Cmd: []string{"/bin/true"}, Labels: map[string]string{"test-image": mark}}, l)
	}
}
