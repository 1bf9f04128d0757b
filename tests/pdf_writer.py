"""A minimal PDF writer for tests and benchmarks: real PDFs with a text layer, no dependency."""


def write_pdf(path, pages: list[str], title: str | None = None):
    """A minimal PDF 1.4: one Helvetica text line per 90 characters; an empty page has no text layer."""

    def escape(line):
        line = line.encode("latin-1", "replace").decode("latin-1")  # the standard Helvetica font has no other characters
        return line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")

    objects = {1: "<< /Type /Catalog /Pages 2 0 R >>", 3: "<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"}
    kids = []
    for index, text in enumerate(pages):
        page, content = 5 + 2 * index, 6 + 2 * index
        kids.append(page)
        words, lines = text.split(), [""]
        for word in words:
            if len(lines[-1]) + len(word) > 90:
                lines.append("")
            lines[-1] += (" " if lines[-1] else "") + word
        stream = ("BT /F1 10 Tf 40 760 Td 12 TL " + " ".join(f"({escape(line)}) Tj T*" for line in lines if line) + " ET") if words else ""
        objects[page] = f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> /Contents {content} 0 R >>"
        objects[content] = f"<< /Length {len(stream)} >>\nstream\n{stream}\nendstream"
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(f'{k} 0 R' for k in kids)}] /Count {len(kids)} >>"
    objects[4] = f"<< /Title ({escape(title)}) >>" if title else "<< >>"
    body, offsets = b"%PDF-1.4\n", {}
    for number in sorted(objects):
        offsets[number] = len(body)
        body += f"{number} 0 obj\n{objects[number]}\nendobj\n".encode("latin-1")
    xref = len(body)
    body += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    body += "".join(f"{offsets[number]:010d} 00000 n \n" for number in sorted(objects)).encode()
    body += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 4 0 R >>\nstartxref\n{xref}\n%%EOF\n".encode()
    path.write_bytes(body)
    return path
