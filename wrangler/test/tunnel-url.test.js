// What a WHATWG URL parser (workerd's, as browsers' and Node's) reads from the tunnel URLs of
// tests/records/tunnel_urls.json (issue 20.5). The Worker itself never reads a tunnel URL: it
// passes /services answers and POST /workers through to the router, which refuses every URL
// that is not in the one canonical form. This is where the WHATWG side of that form is checked:
// each hostile spelling is read as the file says, and each canonical URL exactly as written.
import { describe, expect, it } from "vitest";
import cases from "../../tests/records/tunnel_urls.json";

function whatwgHost(url) {
  try {
    return new URL(url).host;
  } catch {
    return null; // refused by the parser
  }
}

describe("tunnel URLs as a WHATWG parser reads them", () => {
  it("runs inside workerd", () => {
    expect(navigator.userAgent).toBe("Cloudflare-Workers");
  });

  it.each(cases)("$why: $url", ({ url, whatwg_host }) => {
    expect(whatwgHost(url)).toBe(whatwg_host);
  });

  it("reads the issue's URL as an IP literal, where Python read a trycloudflare.com name", () => {
    const read = new URL("https://127.0.0.1\\.trycloudflare.com/");
    expect(read.hostname).toBe("127.0.0.1");
    expect(read.pathname).toBe("/.trycloudflare.com/");
  });

  const canonical = [...new Set(cases.map((c) => c.canonical).filter((c) => c !== null))];
  it.each(canonical)("reads canonical %s as written", (url) => {
    const [scheme, rest] = url.split("://");
    const slash = rest.indexOf("/");
    const authority = slash < 0 ? rest : rest.slice(0, slash);
    const path = slash < 0 ? "" : rest.slice(slash);
    const read = new URL(url);
    expect(read.protocol).toBe(`${scheme}:`);
    expect(read.host).toBe(authority);
    expect(read.pathname).toBe(path || "/");
    expect(read.href).toBe(path ? url : `${url}/`);
  });
});
